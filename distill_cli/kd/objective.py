"""The objective of a kd run: the method of `loss=` with the Hinton term (T, alpha) and the cross-entropy
(`loss.ce_weight`, default 1 - alpha), the feature points both networks hand it, and the kd step that feeds
it the teacher's and the student's outputs.

`build_objective` checks everything a method needs (hyperparameters, feature points of both models,
the dataset, a batch of at least `min_batch` samples, the memory it plans to hold) on the networks as built,
so a bad config fails before any network trains.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.config import KDConfig
from ..core.errors import DistillError
from ..data import DataSplits
from ..data.loader import Batch
from ..losses.base import Method, MethodContext, Objective, Stage, build_method, ce_weight
from ..models.features import PREACT, Outputs, feature_points, stage_points
from ..training.compute import Compute
from ..training.device_memory import available_bytes, byte_size
from ..training.loop import Step


def _expand(points: tuple[str, ...], model: nn.Module, data: DataSplits) -> tuple[str, ...]:
    """`points` with "stages" replaced by the model's `stage1`..`stageN`, "last_stage" by its deepest
    stage and "preacts" by `preact1`..`preactN` (one per stage). A model without them keeps "stage1" or
    "preact1", which the extractor then refuses, naming the model."""
    if not {"stages", "last_stage", "preacts"} & set(points):
        return points
    available = feature_points(model, data.info)
    stages = stage_points(available) or ["stage1"]
    preacts = [f"{PREACT}{point[len('stage'):]}" for point in stages]  # each stage's, refused if missing
    expanded: list[str] = []
    for point in points:
        expanded += {"stages": stages, "last_stage": stages[-1:], "preacts": preacts}.get(point, [point])
    return tuple(expanded)


@torch.no_grad()
def _probe(forward, model: nn.Module, data: DataSplits, compute: Compute) -> dict[str, torch.Size]:
    """The shapes (without the batch axis) of the feature points `forward` returns, from a dummy batch."""
    info = data.info
    training = model.training
    model.eval()
    try:
        images = torch.zeros(2, info.channels, *info.image_size, device=compute.device, dtype=compute.input_dtype)
        with compute.autocast():
            outputs = forward(images)
    finally:
        model.train(training)
    return {name: value.shape[1:] for name, value in outputs.features.items()}


def check_maps(name: str, role: str, shapes: dict[str, torch.Size]) -> None:
    """Refuse in one line a stem or stage feature of `role` that is no map (channels, height, width), such as
    the token sequences of a ViT's blocks: the feature methods pair maps."""
    for point, shape in shapes.items():
        if (point == "stem" or point in stage_points(shapes)) and len(shape) != 3:
            raise DistillError(
                f"loss={name}: {role}'s {point} is {tuple(shape)}, not a feature map (channels, height, width) as the "
                "method pairs them (a ViT's blocks give token sequences); use a logit method (kd, dkd, mse_logits)"
            )


def check_fits(method: Method, name: str, context: MethodContext, compute: Compute) -> None:
    """Refuse in one line a batch smaller than the method's `min_batch` (`batch_size` counts the samples of
    each process's step), and a method whose `planned_memory` exceeds the memory free on the device now."""
    if context.batch_size < method.min_batch:
        processes = compute.world.size
        each = f", per process: each of the {processes} processes steps on batch_size samples" if processes > 1 else ""
        raise DistillError(
            f"batch_size={context.batch_size}: loss={name} compares the samples of a batch with each other and needs "
            f"batch_size >= {method.min_batch}{each}"
        )
    parts = method.planned_memory(context)
    need, free = sum(parts.values()), available_bytes(compute.device)
    if need > free:
        held = "; ".join(f"{what}: {byte_size(size)}" for what, size in parts.items())
        raise DistillError(f"loss={name} would hold ~{byte_size(need)} ({held}), more than the {byte_size(free)} free on {compute.device}")


def objective_of(cfg: KDConfig) -> Objective:
    """The objective `cfg` asks for, not yet set up on networks: what it reads (a teacher, its features)."""
    loss = dict(cfg.loss)
    return Objective(build_method(loss), cfg.T, cfg.alpha, ce_weight(loss, cfg.alpha), cfg.label_smoothing)


def needs_teacher(cfg: KDConfig) -> bool:
    """Whether `cfg`'s objective reads a teacher: the Hinton term (alpha > 0) or the method itself."""
    return objective_of(cfg).needs_teacher


def build_objective(
    cfg: KDConfig, data: DataSplits, compute: Compute, student: nn.Module, teacher: nn.Module | None
) -> tuple[Objective, "callable", "callable | None"]:
    """The objective of `cfg.loss`, with the student's forward pass returning the method's feature
    points and, when the objective needs a teacher, the frozen teacher's (BatchNorm folded,
    inference mode). Both networks are as placed on the device; `teacher` may be an untrained
    network of the right architecture (to check a config before the teacher is trained).
    """
    objective = objective_of(cfg)
    method = objective.method
    if method.needs_teacher and teacher is None:
        raise ValueError("build_objective: the method needs a teacher")
    name = cfg.loss["name"]
    student_points = _expand(method.student_points, student, data)
    student_forward = compute.outputs(student, data.info, student_points, f"loss={name}: student={cfg.student.label}")
    teacher_forward = None
    shapes = {}
    if teacher is not None and objective.needs_teacher:
        teacher_points = _expand(method.teacher_points, teacher, data)
        teacher_forward = compute.frozen_forward(
            teacher, points=teacher_points, info=data.info, role=f"loss={name}: teacher={cfg.teacher.label}"
        )
        shapes = _probe(teacher_forward, teacher, data, compute)
    student_shapes = _probe(student_forward, student, data, compute)
    if not method.token_stages:
        check_maps(name, f"student={cfg.student.label}", student_shapes)
    check_maps(name, f"teacher={cfg.teacher.label}", shapes)
    context = MethodContext(
        num_classes=data.info.num_classes,
        num_train=len(data.train),
        train_labels=data.train.labels.to(compute.device),
        student=student_shapes,
        teacher=shapes,
        epochs=cfg.epochs,
        dataset=data.info.name,
        batch_size=cfg.batch_size,
        world=compute.world,
        info=data.info,
        teacher_network=teacher if teacher_forward is not None else None,
    )
    check_fits(method, name, context, compute)
    method.student_points, method.teacher_points = student_points, tuple(shapes)
    method.setup(context)
    return objective.to(compute.device), student_forward, teacher_forward


def shown(batch: Batch, method: Method) -> Batch:
    """`batch` with the images both networks run on in a step (`Method.step_images`: the batch's own first)."""
    return batch._replace(images=method.step_images(batch.images))


def kd_step(student_forward, teacher_outputs: Callable[[Batch], Outputs] | None, objective: Objective) -> Step:
    """A training step of the student: the teacher's outputs for the batch (`teacher_outputs`: the teacher run,
    or its logits looked up, see `kd.teachers`; None: the objective reads no teacher), the student's, and
    the objective's terms; both networks run on the images the method shows (`shown`), and the logits counted
    for accuracy are the student's on the batch's own."""

    def step(batch, epoch: int):
        showing = shown(batch, objective.method)
        teacher = teacher_outputs(showing) if teacher_outputs is not None else None
        student = student_forward(showing.images)
        return objective(student, teacher, batch, epoch), student.logits[: len(batch.labels)]

    return step


def stage_step(student_forward, teacher_outputs: Callable[[Batch], Outputs], stage: Stage, method: Method) -> Step:
    """A training step of `method`'s stage before distillation (`Stage`): its terms alone from the teacher's
    outputs and, where the stage trains the student, the student's, both on the images the method shows
    (`shown`); the logits counted for accuracy are those of the network the stage trains (the student), else
    the teacher's, on the batch's own images."""

    def step(batch, epoch: int):
        showing = shown(batch, method)
        teacher = teacher_outputs(showing)
        student = student_forward(showing.images) if stage.trains_student else None
        parts = {f"loss/{name}": value.float() for name, value in stage.terms(student, teacher, batch, epoch).items()}
        return {"loss": sum(parts.values()), **parts}, (student or teacher).logits[: len(batch.labels)]

    return step
