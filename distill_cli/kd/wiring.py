"""The one kd wiring: `wire_kd` builds everything a student's kd step needs (the student, the objective on
both networks, the teacher supply and the step), and `check_kd` is the one check before training.

`distill kd` (every training mode), the fused launcher, `distill bench` and the fused memory plan build
their students here; none wires one itself. The training loop then gets only the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import load_checkpoint
from ..core.config import ENSEMBLE, KDConfig, ModelConfig, StudentConfig
from ..core.errors import DistillError
from ..data import Augment, DataSplits
from ..losses.base import Objective, Stage
from ..models import build_model
from ..models.checkpoints import checked_checkpoint, checked_model, describe, rebuilt_model
from ..models.pruning import copy_teacher, keep_zeros
from ..training.compute import Compute
from ..training.loop import Step
from ..training.rng import seed_everything
from .ensemble import untrained_ensemble
from .objective import build_objective, kd_step, needs_teacher, stage_step
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
    stage: Stage | None = None  # what the method trains before distillation (None: nothing)
    stage_step: Step | None = None  # the stage's training step (teacher run live)

    @property
    def trained(self) -> nn.ModuleList:
        """Every weight the optimizer changes: the student's and the method's."""
        return nn.ModuleList([self.student, self.objective])


def build_student(
    model: ModelConfig, data: DataSplits, compute: Compute, key: str = "student", teacher: tuple[ModelConfig, nn.Module] | None = None
) -> nn.Module:
    """A student network placed on the device as kd runs place it; `key` names it in errors. Untrained (from
    the random state as it is), or as `student.checkpoint` holds it (its zeros held at zero, `keep_zeros`),
    or with the weights of `teacher` (its config and network; `student.init=teacher`, `models.pruning.copy_teacher`)."""
    if isinstance(model, StudentConfig) and model.checkpoint is not None:
        path = Path(model.checkpoint)
        network = rebuilt_model(checked_checkpoint(path, model, key, data.info), model, key, path, data.info)
        keep_zeros(network)
        return compute.place(network)
    network = build_model(model, data.info, key)
    if copies_teacher(model):
        teacher_cfg, teacher_network = teacher
        pair = f"teacher {describe(teacher_cfg.arch, teacher_cfg.kwargs)} -> student {describe(model.arch, model.kwargs)}"
        if teacher_cfg.arch != model.arch:
            raise DistillError(f"student.init=teacher: {pair}: the weights copy within one family; it needs a shallower or narrower {teacher_cfg.arch} student")
        copy_teacher(network, teacher_network, torch.zeros(1, data.info.channels, *data.info.image_size), pair)
    return compute.place(network)


def student_shaped(model: ModelConfig, data: DataSplits, compute: Compute) -> nn.Module:
    """A network of the shape `model`'s student trains with (a checkpoint's pruned layers included), with
    the weights it was built with: for measuring (batching, timing), never for training."""
    return build_student(replace(model, init="random") if copies_teacher(model) else model, data, compute)


def copies_teacher(model: ModelConfig) -> bool:
    """The student starts from the teacher's weights (`student.init=teacher`)."""
    return isinstance(model, StudentConfig) and model.init == "teacher"


def student_from_checkpoint(cfg: KDConfig) -> KDConfig:
    """`cfg` with the student's architecture read from `student.checkpoint` (as `distill prune` or a kd run
    wrote it), named after the file; `cfg` itself without one."""
    path = cfg.student.checkpoint
    if path is None:
        return cfg
    checkpoint = load_checkpoint(path)
    if checkpoint["arch"] in (ENSEMBLE, "peers"):
        raise DistillError(f"student.checkpoint {path} holds {checkpoint['arch']}, not one network")
    student = replace(cfg.student, arch=checkpoint["arch"], kwargs=dict(checkpoint["kwargs"]), name=Path(path).name)
    return replace(cfg, student=student)


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
    init_from: nn.Module | None = None,
) -> KDWiring:
    """`cfg`'s student, its objective with the frozen `teacher` (placed on the device; None when the
    objective reads none) and its kd step.

    The teacher supply (`teachers.teacher_supply`): CACHED looks the teacher's logits up in a table made
    once over `transfer` (an unshuffled, unaugmented loader over the training split) for all the runs of
    `shared`; VIEWS looks them up in `views`, the teacher-view store (`teachers.teacher_view_logits`), by
    each image's position and the view it drew; LIVE runs the teacher every step (BatchNorm folded), once
    per batch for all the students of `shared`. The student is `student` as given, or built after seeding
    with `seed` (None: from the random state as it is); `stacked` (a `training.stacked.StackedStudents`)
    runs its forward with the others'. `student.init=teacher` copies `init_from` (the teacher's network,
    also when the objective reads no teacher). A method's stage before distillation (`Method.stage`) comes
    with its own step; the caller runs it (`runs.student.pretrain`).
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
        student = build_student(cfg.student, data, compute, teacher=(cfg.teacher, init_from if init_from is not None else teacher))
    objective, student_forward, teacher_forward = build_objective(cfg, data, compute, student, teacher)
    if teacher_forward is not None and shared is not None:
        key = ("teacher_forward", objective.method.teacher_points)
        teacher_forward = shared.once(key, lambda: once_per_batch(teacher_forward))
    if stacked is not None:
        student_forward = stacked.add(student)
    if teacher_outputs is None and teacher_forward is not None:
        teacher_outputs = run_live(teacher_forward)
    supply = supply if teacher_outputs is not None else NONE
    stage = objective.method.stage()
    before = None if stage is None else stage_step(student_forward, teacher_outputs, stage, objective.method)
    return KDWiring(student, objective, student_forward, kd_step(student_forward, teacher_outputs, objective), supply, stage, before)


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
        copied = copies_teacher(link.cfg.student)
        teacher = untrained_teacher(link.cfg, compute, data, link.teacher) if needs_teacher(link.cfg) or copied else None
        student = build_student(link.cfg.student, data, compute, link.student, teacher=(link.cfg.teacher, teacher))
        build_objective(link.cfg, data, compute, student, teacher if needs_teacher(link.cfg) else None)
    return teacher_supply(links[0].cfg, augment, len(data.train), data.info.num_classes, compute.device)
