"""Atomic file writes (temp file beside the target, fsync, rename): a crash leaves the old file or the new.

A write that runs out of room (full disk, quota, file size limit) becomes a one-line DistillError that
names the folder and the file; the file it was replacing is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import DistillError

# mkstemp creates files 0600; give finished files the mode an ordinary open() would (0666 - umask)
UMASK = os.umask(0)


# the errors of a write that found no room, as the one-line message says them
_NO_ROOM = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EFBIG: "file size limit reached on",  # RLIMIT_FSIZE (ulimit -f), or the filesystem's largest file
}


def _no_room(error: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind `error`: itself, or one it was raised from or while handling
    (torch's zip writer reports a failed write as `RuntimeError: ... unexpected pos`), else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return error
        error = error.__cause__ or error.__context__
    return None


def _no_room_error(error: OSError, path: Path, kept: str | None = None) -> DistillError:
    intact = f" ({kept} kept)" if kept else ""
    return DistillError(f"{_NO_ROOM[error.errno]} {path.parent} while writing {path.name}{intact}")


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], Any], backup: Path | None = None, kept: str | None = None
) -> None:
    """Write via `write(file)` to a temp file beside `path`, fsync, then rename over `path`.

    With `backup`, the file being replaced is first renamed to `backup` (a crash between the two
    renames leaves `backup` and no `path`; readers fall back to `backup`). Out of space, the temp file
    is removed and a DistillError says so and that `kept` (default: the previous `path`) is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        full = _no_room(error)
        if full is None or not isinstance(error, Exception):  # an interrupt stays an interrupt
            raise
        raise _no_room_error(full, path, (kept or f"the previous {path.name}") if path.exists() else None) from error


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path`; out of space, a one-line DistillError as in `atomic_write` (a line cut
    short stays cut: metrics.jsonl, appended per epoch, is rewritten from the checkpoint on resume)."""
    try:
        with Path(path).open("a") as file:
            file.write(text)
    except OSError as error:
        if error.errno not in _NO_ROOM:
            raise
        raise _no_room_error(error, Path(path)) from error


def write_text_atomic(text: str, path: Path) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)
