"""The function behind each command Hydra runs (`kind="hydra"` in `core.commands.COMMANDS`): it takes the
validated config dataclass and a run folder, so tests and notebooks call it without Hydra."""

from __future__ import annotations

from .bench import run_bench
from .kd import run_kd
from .train import run_train

RUNNERS = {"train": run_train, "kd": run_kd, "bench": run_bench}


def runner(command: str):
    """The function that runs `command`."""
    return RUNNERS[command]
