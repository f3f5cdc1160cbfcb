"""Whether torchrun started this process, read from its environment, how such a process exits, and how a sweep's
parallel jobs share the cores (no torch here: the CLI asks first).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def torchrun_world_size() -> int:
    """The number of processes torchrun started this one among (0: torchrun did not start it)."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0


def exit_process(status: int) -> NoReturn:
    """Exit with `status`. A process torchrun started skips the interpreter's finalization (its logs and streams
    flushed first; its files were written and closed by then): torch's distributed threads, torn down there, have
    aborted a rank after its run completed (SIGABRT, "terminate called without an active exception", no Python
    frame), 2 of about 40 two-process runs on this project's CPU machine, and torchrun then failed the run."""
    if torchrun_world_size():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def available_cpus() -> int:
    """The cores this process may run on: its affinity mask where the OS has one (taskset, cpusets, SLURM),
    else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Hydra launchers that run a sweep's jobs side by side in processes of this machine, and the key of their
# config that says how many at once (Hydra's joblib launcher: joblib's n_jobs, -1 = every core)
PARALLEL_LAUNCHERS = {"JoblibLauncher": "n_jobs"}


def jobs_at_once(launcher) -> int:
    """How many jobs of a sweep the launcher (`hydra.launcher`: its `_target_` and settings) runs at once on
    this machine: joblib's `n_jobs` (negative counts back from the cores as joblib does: -1 = all, -2 = all
    but one), 1 for launchers that run them one after another (basic, fused) or elsewhere (SLURM)."""
    key = PARALLEL_LAUNCHERS.get(str(getattr(launcher, "_target_", "")).rsplit(".", 1)[-1])
    value = getattr(launcher, key, None) if key else None
    if not isinstance(value, int) or value == 0:
        return 1
    return max(available_cpus() + 1 + value, 1) if value < 0 else value


def threads_per_job(jobs: int, processes: int = 1) -> int:
    """The torch threads each of `processes` processes of each of `jobs` jobs gets when they split this
    machine's cores (`available_cpus`) evenly; at least one."""
    return max(1, available_cpus() // max(1, jobs * processes))
