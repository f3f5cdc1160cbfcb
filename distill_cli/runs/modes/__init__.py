"""The training modes of `distill kd`, one module each, picked by `KDConfig.mode` (the keys that turn each
on: `core.config.MODE_KEYS`).

- "single" (runs/student.py): one student taught by one teacher (`teacher=ensemble` is a kind of teacher,
  so it works here and as generation 1's teacher).
- "mutual" (mutual.py, `peers=[...]`): deep mutual learning, networks trained together from scratch.
- "born_again" (born_again.py, `generations=N`): born-again networks, each generation taught by the one before.
- "assistants" (assistants.py, `assistants=[...]`): a teacher-assistant chain, teacher -> assistants -> student.

A mode is `train(run, summary)`, which trains into `run.run_dir` and fills the run's summary (a mode that
runs whole kd runs of its own, generations or links, starts them with `run.nested`), and `links(cfg)`, the
teacher -> student pairs it wires, which `run_kd` checks (`kd.wiring.check_kd`) before anything trains;
`links` also refuses what the mode cannot do with the config. A new mode: a module here, a row in MODES,
its key in `MODE_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...core.config import KDConfig
from ...kd.wiring import Link
from .. import student
from ..common import KDRun
from . import assistants, born_again, mutual


@dataclass(frozen=True)
class Mode:
    train: Callable[[KDRun, dict], None]
    links: Callable[[KDConfig], list[Link]]


MODES: dict[str, Mode] = {
    "single": Mode(student.distil, student.links),
    "mutual": Mode(mutual.mutual_learning, mutual.links),
    "born_again": Mode(born_again.born_again, born_again.links),
    "assistants": Mode(assistants.assistant_chain, assistants.links),
}
