"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistillError(Exception):
    """A problem the user can fix (bad config, missing file, ...); printed as one line, no traceback."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A short hint listing the closest valid names to `name`, or all of them when none is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return f"choose from: {', '.join(choices)}"
