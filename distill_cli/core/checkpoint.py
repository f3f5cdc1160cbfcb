"""Model checkpoints: written atomically, verified and loaded with weights_only=True (no code runs on load).

A run folder keeps `best.pt` (best on the validation split), `last.pt` (the newest training state)
and `last.prev.pt` (the `last.pt` it replaced), so a damaged `last.pt` still leaves one to resume from.
Every load checks the zip archive's CRCs (torch.load does not), so damage is found, not loaded; a file that
is no distill checkpoint is refused in one line saying what it is, as far as the file tells.
"""

from __future__ import annotations

import codecs
import logging
import re
import warnings
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


WEB_PAGE = "an HTML page (a download that saved a web page instead of the file?)"
# what a file torch.load cannot read is, and where it came from, told by its first bytes (in lower case)
FILE_STARTS = {
    b"version https://git-lfs": "a Git LFS pointer, not the file it points to (`git lfs pull` fetches that)",
    b"<!doctype html": WEB_PAGE,
    b"<html": WEB_PAGE,
    b"\x93numpy": "a NumPy array (numpy.save)",
    b"\x89hdf": "an HDF5 file (Keras and others write these)",
    b"\x80\x04": "a Python pickle (pickle.dump), not a file torch.save writes",
    b"\x80\x05": "a Python pickle (pickle.dump), not a file torch.save writes",
}
# ... and a zip archive, by a file it holds (beside its top folder)
ARCHIVE_MEMBERS = {
    "archive_format": "a torch.export program (.pt2, as `distill export format=pt2` writes; give the best.pt it came from)",
    "constants.pkl": "a TorchScript archive (torch.jit.save)",
}
ZIP_START = b"PK\x03\x04"  # the first bytes of a zip archive, as torch.save writes them
HEAD_BYTES = 512  # the first bytes of a file read to tell what it is
TEXT_SHOWN = 40  # characters of a text file quoted in the refusal


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
    """Load and verify a distill checkpoint with `weights_only=True`; any failure becomes a one-line DistillError."""
    return distill_checkpoint(read_checkpoint_file(path), Path(path))


def read_checkpoint_file(path: str | Path) -> Any:
    """What a file torch.save wrote holds (a distill checkpoint or another tool's), verified and loaded with
    `weights_only=True`; a missing, damaged or unsafe file is a one-line DistillError."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as file:
            head = file.read(HEAD_BYTES)
    except OSError as error:
        raise DistillError(f"cannot read checkpoint {path}: {error.strerror}") from None
    # torch.load does not check the CRCs its zip format stores: a flipped bit would load silently
    damage = "the file is empty" if not head else _damage(path) if head.startswith(ZIP_START) else None
    if damage:
        raise DistillError(f"cannot load checkpoint {path}: {damage}")
    try:
        with warnings.catch_warnings():  # torch's warnings about the files it then refuses: the refusal says it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file, ...
        raise _not_a_checkpoint(path, head, error) from None
    return checkpoint


def distill_checkpoint(checkpoint: Any, path: Path) -> dict:
    """`checkpoint` (as read from `path`) if it is a distill model checkpoint of a format this distill reads."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
        raise DistillError(f"{path} is not a distill model checkpoint: it holds {_contents(checkpoint)}, without the arch and state_dict distill writes")
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise DistillError(
            f"{path} has checkpoint format {version!r}; this distill reads formats 1 to {FORMAT_VERSION} (a newer distill wrote it?)"
        )
    return checkpoint


def _not_a_checkpoint(path: Path, head: bytes, error: Exception) -> DistillError:
    """The one line for a file torch.load refused (`head`: its first bytes), in our words: what the file is,
    as far as it says."""
    kind = _file_kind(path, head)
    # a file torch.save wrote, refused by torch.load's weights_only unpickler (text starting with "c" would
    # read as a pickled global too: hence only where the file is nothing else)
    unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))  # "Unsupported global: GLOBAL m.f", "unsupported GLOBAL m.f whose ..."
    if unsafe and not kind:
        return DistillError(
            f"{path} is not a checkpoint distill can load safely: it holds a pickled Python object ({unsafe[1]}) and "
            "distill loads only tensors and plain data, so that a file runs no code (torch.load with weights_only; "
            "torch.save(model) writes such files)"
        )
    return DistillError(f"{path} is not a checkpoint distill can load: {kind or f'torch.load cannot read it ({_reason(error)})'}")


def _file_kind(path: Path, head: bytes) -> str:
    """What the file is, from its first bytes `head` and (a zip archive) the files it holds; "" when it does
    not say."""
    if head.startswith(ZIP_START):  # intact: `_damage` found nothing wrong with it
        with zipfile.ZipFile(path) as archive:
            members = {name.split("/", 1)[-1] for name in archive.namelist()}
        kinds = [kind for member, kind in ARCHIVE_MEMBERS.items() if member in members]
        if "data.pkl" not in members:
            kinds.append("a zip archive torch.save did not write")
    else:
        kinds = [kind for start, kind in FILE_STARTS.items() if head.lower().startswith(start)]
    if kinds:
        return f"it is {kinds[0]}"
    try:  # a character cut at the end of `head` is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return ""
    if all(character.isprintable() or character.isspace() for character in text):
        return f"it is text, beginning {' '.join(text.split())[:TEXT_SHOWN]!r}"
    return ""


def _reason(error: Exception) -> str:
    """torch.load's reason in one line: the unpickler's own words when it gives them, else the first line."""
    text = str(error).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if detail:
        return detail[1].strip()
    if text.startswith("Weights only load failed"):  # the rest is advice to load it unsafely
        return "it holds more than tensors and plain data"
    return text.splitlines()[0] if text else type(error).__name__


def _contents(value: Any) -> str:
    """What a loaded file holds, in a few words: a state_dict alone, a dict's keys, or the object's type."""
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return f"{len(value)} tensor{'s' if len(value) > 1 else ''} by name (a state_dict alone)"
    if isinstance(value, dict):
        keys = [str(key) for key in value][:6]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(value) > len(keys) else ''}"
    return f"a {type(value).__name__}"


def _first_difference(old: Any, new: Any, added: list[str], key: str = "") -> str | None:
    """The first key (dotted) where two plain configs differ, or None. Keys `old` lacks were added to distill
    since it was written (they have their default there): not differences, collected in `added`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(old.keys() | new.keys()):
            dotted = f"{key}.{name}" if key else name
            if name not in old:
                added.append(f"{dotted}={new[name]!r}")
                continue
            found = _first_difference(old.get(name), new.get(name), added, dotted)
            if found:
                return found
        return None
    return None if old == new else f"{key}: {old!r} then, {new!r} now"


# config keys that do not change the training: resuming itself, the trackers metrics also go to, and the
# published numbers a preset sets beside the results
_NOT_TRAINING = ("resume", "logger", "published")


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
        added: list[str] = []
        difference = _first_difference(saved, {k: v for k, v in config.items() if k not in _NOT_TRAINING}, added)
        if difference:
            raise DistillError(f"cannot resume {run_dir}: the config changed since {path.name} was written ({difference})")
        if added:
            log.warning(f"{path.name} was written before these config keys existed; resuming with {', '.join(added)}")
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
