"""Training modes of `distill kd` beyond one student taught by one teacher, one module each.

- `teacher=ensemble` (ensemble.py): the teacher is several teachers' averaged softened probabilities; a
  teacher kind, so it works in the plain mode and as generation 1's teacher.
- `peers=[...]` (mutual.py): deep mutual learning, networks trained together from scratch.
- `generations=N` (born_again.py): born-again networks, each generation taught by the one before.
- `assistants=[...]` (assistants.py): a teacher-assistant chain, teacher -> assistants -> student.

Each mode is a function `train(run: KDRun, summary: dict)` that trains into `run.run_dir` and fills the
run's summary; `run_kd` picks it with `kd_mode`, then writes and prints the summary.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import KDConfig
from ..tasks import KDRun, distil
from .assistants import assistant_chain
from .born_again import born_again
from .mutual import mutual_learning

Mode = Callable[[KDRun, dict], None]

MODES: dict[str, Mode] = {
    "single": distil,
    "mutual": mutual_learning,
    "born_again": born_again,
    "assistants": assistant_chain,
}


def kd_mode(cfg: KDConfig) -> tuple[str, Mode]:
    """The mode `cfg` asks for (the config allows at most one of peers, generations and assistants)."""
    chosen = {"mutual": bool(cfg.peers), "born_again": cfg.generations > 1, "assistants": bool(cfg.assistants)}
    name = next((name for name, on in chosen.items() if on), "single")
    return name, MODES[name]
