"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import difflib
import signal
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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run; `where` says how far training got (its checkpoint is saved).

    A KeyboardInterrupt, so it stops a Hydra sweep as Ctrl-C does instead of failing one job.
    """

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum, where)
        self.signum = signum
        self.where = where
        self.run_dir = None  # the run folder it stopped, once known

    @classmethod
    def wrap(cls, interrupt: KeyboardInterrupt) -> "Interrupted":
        """`interrupt` as an Interrupted: a plain KeyboardInterrupt is Ctrl-C (SIGINT) outside training."""
        return interrupt if isinstance(interrupt, cls) else cls(signal.SIGINT)

    def describe(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}" + (f" ({self.where})" if self.where else "")
