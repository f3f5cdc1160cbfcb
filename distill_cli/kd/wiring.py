"""The one kd wiring: `wire_kd` builds everything a student's kd step needs (the student, the objective on
both networks, the teacher supply and the step), and `check_kd` is the one check before training.

`distill kd` (every training mode), the fused launcher, `distill bench` and the fused memory plan build
their students here; none wires one itself. The training loop then gets only the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.config import ENSEMBLE, KDConfig, ModelConfig
from ..data import Augment, DataSplits
from ..losses.base import Objective
from ..models import build_model
from ..models.checkpoints import checked_checkpoint, checked_model
from ..training.compute import Compute
from ..training.loop import Step
from ..training.rng import seed_everything
from .ensemble import untrained_ensemble
from .objective import build_objective, kd_step, needs_teacher
from .teachers import (
    CACHED,
    LIVE,
    NONE,
    VIEWS,
    Shared,
    look_up_logits,
    look_up_views,
    once_per_batch,
    run_live,
    teacher_logits,
    teacher_supply,
)


@dataclass
class KDWiring:
    """One student's kd step, as `wire_kd` builds it."""

    student: nn.Module
    objective: Objective  # the method's terms and trainable parts (trained with the student)
    student_forward: Callable[[torch.Tensor], object]  # images -> the student's Outputs (logits, the method's points)
    step: Step
    supply: str  # how the step gets the teacher's outputs: teachers.NONE, LIVE, CACHED or VIEWS

    @property
    def trained(self) -> nn.ModuleList:
        """Every weight the optimizer changes: the student's and the method's."""
        return nn.ModuleList([self.student, self.objective])


def build_student(model: ModelConfig, data: DataSplits, compute: Compute, key: str = "student") -> nn.Module:
    """A student network (untrained, from the random state as it is) placed on the device as kd runs place
    it; `key` names it in errors."""
    return compute.place(build_model(model, data.info, key))


def wire_kd(
    cfg: KDConfig,
    data: DataSplits,
    compute: Compute,
    teacher: nn.Module | None,
    *,
    supply: str = LIVE,
    transfer=None,
    views: torch.Tensor | None = None,
    shared: Shared | None = None,
    seed: int | None = None,
    student: nn.Module | None = None,
    stacked=None,
) -> KDWiring:
    """`cfg`'s student, its objective with the frozen `teacher` (placed on the device; None when the
    objective reads none) and its kd step.

    The teacher supply (`teachers.teacher_supply`): CACHED looks the teacher's logits up in a table made
    once over `transfer` (an unshuffled, unaugmented loader over the training split) for all the runs of
    `shared`; VIEWS looks them up in `views`, the teacher-view store (`teachers.teacher_view_logits`), by
    each image's position and the view it drew; LIVE runs the teacher every step (BatchNorm folded), once
    per batch for all the students of `shared`. The student is `student` as given, or built after seeding
    with `seed` (None: from the random state as it is); `stacked` (a `training.stacked.StackedStudents`)
    runs its forward with the others'.
    """
    teacher_outputs = None
    if supply == CACHED:

        def table() -> torch.Tensor:
            return teacher_logits(teacher, transfer, compute, data.info.num_classes)

        teacher_outputs = look_up_logits(shared.once("teacher_logits", table) if shared is not None else table())
    elif supply == VIEWS:
        teacher_outputs = look_up_views(views)
    if seed is not None:
        seed_everything(seed)
    if student is None:
        student = build_student(cfg.student, data, compute)
    objective, student_forward, teacher_forward = build_objective(cfg, data, compute, student, teacher)
    if teacher_forward is not None and shared is not None:
        key = ("teacher_forward", objective.method.teacher_points)
        teacher_forward = shared.once(key, lambda: once_per_batch(teacher_forward))
    if stacked is not None:
        student_forward = stacked.add(student)
    if teacher_outputs is None and teacher_forward is not None:
        teacher_outputs = run_live(teacher_forward)
    supply = supply if teacher_outputs is not None else NONE
    return KDWiring(student, objective, student_forward, kd_step(student_forward, teacher_outputs, objective), supply)


@dataclass
class Link:
    """One teacher -> student pair of a run, as `check_kd` builds it: `cfg` names both networks and the
    method; `student` and `teacher` name them in errors."""

    cfg: KDConfig
    student: str = "student"
    teacher: str = "teacher"


def untrained_teacher(cfg: KDConfig, compute: Compute, data: DataSplits, key: str = "teacher") -> nn.Module:
    """The teacher's network as built before training (for a given checkpoint: checked against its
    metadata and its weights loaded once; an ensemble: its members), to check a config before anything trains."""
    if cfg.teacher.arch == ENSEMBLE:
        return untrained_ensemble(cfg, compute, data)
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)

        def check_file() -> None:  # its metadata and weights (another tool's file: its names mapped)
            checkpoint = checked_checkpoint(path, cfg.teacher, "teacher", data.info)
            checked_model(checkpoint, cfg.teacher, "teacher", path, data.info)

        compute.world.on_main(check_file)
    return compute.place(build_model(cfg.teacher, data.info, key))


def check_kd(links: list[Link], data: DataSplits, compute: Compute, augment: Augment | None) -> str:
    """The check before training, for every command and mode: each link of the run (`links[0]` the run's
    own, its teacher as given: a checkpoint's metadata, an ensemble's members; the others a training mode's)
    built untrained, the method set up on both networks with the feature points it reads, so that a bad
    config fails before any network trains. Returns the first link's teacher supply (`teacher_supply` of the
    transfer set, augmented with `augment` or not: None)."""
    for link in links:
        student = build_student(link.cfg.student, data, compute, link.student)
        teacher = untrained_teacher(link.cfg, compute, data, link.teacher) if needs_teacher(link.cfg) else None
        build_objective(link.cfg, data, compute, student, teacher)
    return teacher_supply(links[0].cfg, augment, len(data.train), data.info.num_classes, compute.device)
