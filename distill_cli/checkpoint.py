"""Checkpoints and run files: atomic writes (temp file + rename) and safe loads (weights_only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DistillError

FORMAT_VERSION = 1

# mkstemp creates files 0600; give finished files the mode an ordinary open() would (0666 - umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Write via `write(file)` to a temp file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically: a crash leaves the old file or the new one, never half."""
    _atomic_write(Path(path), lambda file: torch.save(obj, file))


def write_json_atomic(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _atomic_write(Path(path), lambda file: file.write(text.encode()))


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
