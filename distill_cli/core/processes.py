"""`distill <command> [overrides]`: a thin layer that hands each command to Hydra.

Hydra keeps its usual behaviour (composition, `-m` sweeps, `--cfg job`, `--help`, run folders,
logging); this module only picks the primary config, and turns every error into one line on
stderr and a non-zero exit. Set HYDRA_FULL_ERROR=1 to see the traceback instead.
"""

from __future__ import annotations

import os


def torchrun_world_size() -> int:
    """The number of processes torchrun started this one among (0: torchrun did not start it)."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0
