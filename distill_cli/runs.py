"""Run folders: how a run ended, and how `distill resume <run dir>` continues one.

No torch here: the CLI reads run folders before it imports anything heavy.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_status(run_dir: Path) -> str | None:
    """`status` in `run_dir/summary.json` (completed, failed, interrupted); None while it has none."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
