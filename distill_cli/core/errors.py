"""The one exception type the CLI turns into a one-line message and a non-zero exit, the interrupt that
stops a run with its checkpoint saved (`StopSignals` defers it to a safe point), and `one_line`: the one-line message of any error.
"""

from __future__ import annotations

import difflib
import re
import signal
import threading
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


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`, and the holder stops at its next safe point (training:
    the next step boundary, with a checkpoint saved; a failed or interrupted run: once its summary is written).
    A second signal interrupts at once. Only the main thread can catch signals."""

    def __enter__(self) -> "StopSignals":
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, "a second signal: stopped without saving")
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def one_line(error: BaseException) -> str:
    """A one-line message for any error, naming the config key where there is one."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) or "Available options in" in str(error):
        return _missing_option(str(error))
    # Hydra wraps OmegaConf errors (wrong type, unknown key) raised while merging overrides
    cause = error
    while cause is not None and not isinstance(cause, (OmegaConfBaseException, DistillError)):
        cause = cause.__cause__
    if isinstance(cause, DistillError):
        return str(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "msg", None):
        key = getattr(cause, "full_key", None)
        text = _first_line(cause.msg).replace("is not in struct", "is not a known key")
        if key and key not in text:
            text = f"{key}: {text}"
        if key and ".kwargs." in key:
            text += f" (a model argument missing from the model's YAML is added with +{key}=...)"
        return text
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"cannot use {error.filename}: {error.strerror}"
    text = _first_line(str(error)) or type(error).__name__
    if isinstance(error, (DistillError, HydraException)):
        return text
    return f"{type(error).__name__}: {text} (set HYDRA_FULL_ERROR=1 for the traceback)"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _missing_option(text: str) -> str:
    """'Could not find teacher/foo ... Available options in teacher: ...' as one line with suggestions."""
    match = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if not match:
        return _first_line(text)
    group, name = match.groups()
    listing = text.split("Available options in", 1)[1].split("\n\n", 1)[0] if "Available options in" in text else ""
    options = re.findall(r"^\t(\S+)\s*$", listing, flags=re.MULTILINE)
    plugin = " (if it is a Hydra plugin's, install it: pip install 'distill-cli[sweeps]')" if group.startswith("hydra/") else ""
    return f"{group}={name}: no such {group} option; {did_you_mean(name, options)}{plugin}"
