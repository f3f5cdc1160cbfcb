"""Model checkpoints: written atomically, loaded with weights_only=True (no code runs on load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DistillError
from .files import atomic_write

FORMAT_VERSION = 1

def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically: a crash leaves the old file or the new one, never half."""
    atomic_write(path, lambda file: torch.save(obj, file))


def model_checkpoint(model: nn.Module, arch: str, kwargs: dict, num_classes: int, **extra: Any) -> dict:
    """A self-describing checkpoint: weights plus what is needed to rebuild and check the model."""
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "kwargs": dict(kwargs),
        "num_classes": num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with `weights_only=True`; any failure becomes a one-line DistillError."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
        raise DistillError(f"{path} is not a distill model checkpoint")
    return checkpoint
