"""Atomic file writes (temp file beside the target, fsync, rename): a crash leaves the old file or the new."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# mkstemp creates files 0600; give finished files the mode an ordinary open() would (0666 - umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], backup: Path | None = None) -> None:
    """Write via `write(file)` to a temp file beside `path`, fsync, then rename over `path`.

    With `backup`, the file being replaced is first renamed to `backup` (a crash between the two
    renames leaves `backup` and no `path`; readers fall back to `backup`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))
