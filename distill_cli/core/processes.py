"""Whether torchrun started this process, read from its environment (no torch here: the CLI asks first).
"""

from __future__ import annotations

import os


def torchrun_world_size() -> int:
    """The number of processes torchrun started this one among (0: torchrun did not start it)."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0
