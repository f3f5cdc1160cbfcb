"""Model checkpoints: written atomically, verified and loaded with weights_only=True (no code runs on load).

A run folder keeps `best.pt` (best on the validation split), `last.pt` (the newest training state)
and `last.prev.pt` (the `last.pt` it replaced), so a damaged `last.pt` still leaves one to resume from.
Every load checks the zip archive's CRCs (torch.load does not), so damage is found, not loaded.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DistillError
from .files import atomic_write

# 1: weights and metadata; 2: adds "training" to last.pt (optimizer, RNG and data order: see engine.fit);
# 3: last.pt's "training" holds the KD method's trainable parts and buffers under "method"
FORMAT_VERSION = 3


LAST, PREVIOUS, BEST = "last.pt", "last.prev.pt", "best.pt"


DAMAGED = "last.damaged.pt"  # a last.pt that could not be resumed from, kept aside for a look


log = logging.getLogger("distill")


def save_atomic(obj: Any, path: Path, backup: Path | None = None, kept: str | None = None) -> None:
    """torch.save `obj` to `path` atomically: a crash or a full disk leaves the old file or the new one,
    never half (see `atomic_write`)."""
    atomic_write(path, lambda file: torch.save(obj, file), backup=backup, kept=kept)


def save_last(checkpoint: dict, run_dir: Path) -> None:
    """Write `run_dir/last.pt`, keeping the one it replaces as `last.prev.pt`."""
    save_atomic(checkpoint, run_dir / LAST, backup=run_dir / PREVIOUS, kept="last good checkpoint")


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


def _damage(path: Path) -> str | None:
    """Why the zip archive torch.save writes is damaged (truncated, or a CRC mismatch), or None if it is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"damaged or truncated file ({error})"
    return None if bad is None else f"damaged file (CRC mismatch in {bad})"


def load_checkpoint(path: str | Path) -> dict:
    """Load and verify a checkpoint with `weights_only=True`; any failure becomes a one-line DistillError."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"checkpoint not found: {path}")
    # torch.load does not check the CRCs its zip format stores: a flipped bit would load silently
    damage = _damage(path) if zipfile.is_zipfile(path) else None
    if damage:
        raise DistillError(f"cannot load checkpoint {path}: {damage}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
        raise DistillError(f"{path} is not a distill model checkpoint")
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise DistillError(
            f"{path} has checkpoint format {version!r}; this distill reads formats 1 to {FORMAT_VERSION} (a newer distill wrote it?)"
        )
    return checkpoint


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """The first key (dotted) where two plain configs differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(old.keys() | new.keys()):
            found = _first_difference(old.get(name), new.get(name), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    return None if old == new else f"{key}: {old!r} then, {new!r} now"


# config keys that do not change the training: resuming itself, and the trackers metrics also go to
_NOT_TRAINING = ("resume", "logger")


def load_resume_checkpoint(run_dir: Path, config: dict) -> dict | None:
    """The training state to resume `run_dir` from: `last.pt`, else `last.prev.pt`; None if neither exists yet.

    Raises when checkpoints exist but none is usable, or when `config` (minus `resume`) is not the
    config that wrote it (trackers aside): the run would not continue as it started. A damaged last.pt is renamed
    to last.damaged.pt, so that the next save does not rotate it over the good last.prev.pt.
    """
    problems = []
    for path in (run_dir / LAST, run_dir / PREVIOUS):
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except DistillError as error:
            problems.append(str(error))
            continue
        if "training" not in checkpoint:
            problems.append(f"{path} holds no training state (checkpoint format {checkpoint['format_version']})")
            continue
        saved = {k: v for k, v in checkpoint.get("config", {}).items() if k not in _NOT_TRAINING}
        difference = _first_difference(saved, {k: v for k, v in config.items() if k not in _NOT_TRAINING})
        if difference:
            raise DistillError(f"cannot resume {run_dir}: the config changed since {path.name} was written ({difference})")
        if problems:
            (run_dir / LAST).replace(run_dir / DAMAGED)
            log.warning(f"{problems[0]}; kept it as {DAMAGED}, resuming from {path} instead")
        return checkpoint
    if problems:
        raise DistillError(f"cannot resume {run_dir}: {'; '.join(problems)}")
    return None


def resume_position(run_dir: Path, config: dict) -> tuple[int, int]:
    """(epochs done, steps done of the next epoch) that the training in `run_dir` resumes from (see
    `load_resume_checkpoint`), as `engine.Training.position` will have it; (0, 0) where nothing was saved yet."""
    checkpoint = load_resume_checkpoint(run_dir, config)
    if checkpoint is None:
        return 0, 0
    partial = checkpoint["training"]["partial"]
    return checkpoint["epoch"], 0 if partial is None else partial["steps"]
