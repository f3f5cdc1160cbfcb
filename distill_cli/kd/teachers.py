"""How a kd step gets the teacher's outputs (the teacher supply): not at all, run live (frozen, BatchNorm
folded, once per batch for all the students that share it), or looked up in a table of its logits
computed once (`cache_teacher`, exact only when every epoch shows the teacher the same images)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.config import KDConfig
from ..core.errors import DistillError
from ..training.compute import Compute
from .objective import objective_of

NONE, LIVE, CACHED = "none", "live", "cached logits"  # the teacher supplies


def teacher_supply(cfg: KDConfig, augmented: bool) -> str:
    """How `cfg`'s kd steps get the teacher's outputs when the transfer set is `augmented` or not: NONE when
    the objective reads no teacher (loss=kd alpha=0); CACHED (`cache_teacher`: auto or true) when the method
    reads the teacher's logits alone and the transfer set is not augmented (then every epoch shows the
    teacher the same images, and the lookup is exact); else LIVE. `cache_teacher=true` where the lookup
    would not be exact is refused."""
    objective = objective_of(cfg)
    if cfg.cache_teacher == "true":
        if objective.reads_teacher_features:
            raise DistillError(
                f"cache_teacher=true: loss={cfg.loss['name']} reads the teacher's features, not only its "
                "logits; only logits are cached (use cache_teacher=auto)"
            )
        if augmented:
            raise DistillError(
                "cache_teacher=true: with dataset.augment=true each epoch shows new views, and one cached logit per "
                "image is not what the teacher says about them; use dataset.augment=false or cache_teacher=auto"
            )
    if not objective.needs_teacher:
        return NONE
    exact = not augmented and not objective.reads_teacher_features
    return CACHED if exact and cfg.cache_teacher != "false" else LIVE


@torch.no_grad()
def teacher_logits(teacher: nn.Module, loader, compute: Compute, num_classes: int) -> torch.Tensor:
    """The frozen teacher's float32 logits for every image `loader` holds, indexed by position (N, classes).

    With an unaugmented loader these are what the teacher computes in a training step (the same
    frozen forward and autocast), so a kd step may look them up instead of running the teacher.
    """
    forward = compute.frozen_forward(teacher, compile=False)  # one pass: not worth compiling
    table = torch.empty(loader.num_images, num_classes, device=compute.device)
    for batch in loader:
        with compute.autocast():
            table[batch.index] = forward(batch.images).logits.float()
    return table


class Shared:
    """Work that kd runs on the same data with the same teacher do once for all (a fused group's jobs share
    one; a run alone has its own): results by key, made on first use."""

    def __init__(self):
        self.results: dict = {}
        self.stacked = None  # a training.stacked.StackedStudents: the students' forward passes run as one

    def once(self, key, make: Callable[[], object]):
        """The result of `key`, made by `make()` the first time it is asked for."""
        if key not in self.results:
            self.results[key] = make()
        return self.results[key]


def once_per_batch(forward: Callable) -> Callable:
    """`forward` that runs once per batch: called again with the same images tensor (the next student's
    step on the same batch), it returns the outputs it computed for them."""
    last: dict = {}

    def shared_forward(images):
        if last.get("images") is not images:
            last.update(images=images, outputs=forward(images))
        return last["outputs"]

    return shared_forward
