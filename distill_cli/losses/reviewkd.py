"""Knowledge review (Chen et al. 2021, "Distilling Knowledge via Knowledge Review"): each teacher level is
regressed from the student's features of that level and every deeper one. Levels are the stage outputs
and the pooled feature (as a 1x1 map). From the deepest level up, an attention-based fusion (ABF) module
reduces the student's map to a shared width (1x1 conv + BN), blends it with the deeper level's fused map
(nearest-upsampled) by two per-pixel attention weights (1x1 conv on both + sigmoid), passes the blend on
to the next level, and maps it to the teacher's channel count (3x3 conv + BN). The hierarchical context
loss (HCL) compares each output with the teacher's map at full resolution and average-pooled to 4x4, 2x2
and 1x1 (the sizes smaller than the map), weights 1, 1/2, 1/4, ... normalised to sum 1:

    reviewkd = weight * min(epoch / warmup_epochs, 1) * sum over levels of HCL(ABF output, teacher map)

Defaults as mdistiller's CIFAR-100 run (resnet32x4 -> resnet8x4; the authors' script uses the same 5 for
most pairs): weight 5, warm-up over 20 epochs, shared width min(512, student's pooled width), CE weight 1.
Nets with different stage counts pair their stages from the deepest back (`base.stage_pairs`).

As the authors' code and mdistiller (`preact=True` on the teacher, `STU_PREACT = False`), the teacher's
stage levels are its pre-activation stage outputs (the `preactN` feature points, see `ofd`) and the
student's are its stage outputs after the ReLU; both pooled features are as the classifier reads them. A
teacher without pre-activation points (MobileNetV2's linear bottlenecks, ShuffleNetV2's concatenations:
their stages end in no ReLU) is refused in one line before training, as for `ofd`.

When the student's and the teacher's maps of a level differ in size (of the peers' CIFAR pairs, only
ShuffleNet and MobileNet students), the blend is nearest-resized to the teacher's size before the 3x3 conv
and handed on at that size, as the authors' ABF does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import PREACT
from . import LOSSES
from .base import Method, MethodContext, non_negative, stage_pairs

MAX_SHARED_WIDTH = 512  # the authors' cap on the ABF width


class AttentionFusion(nn.Module):
    """One ABF module: a student map to the shared width, blended with the deeper level's blend (when
    `fuse`) by two per-pixel attention weights, and mapped to the teacher's channel count."""

    def __init__(self, in_channels: int, shared: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, shared, 1, bias=False), nn.BatchNorm2d(shared))
        self.attention = nn.Sequential(nn.Conv2d(2 * shared, 2, 1), nn.Sigmoid()) if fuse else None
        self.project = nn.Sequential(
            nn.Conv2d(shared, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # as the authors

    def forward(self, student: Tensor, deeper: Tensor | None, size: torch.Size) -> tuple[Tensor, Tensor]:
        """(output with the teacher's channel count and map `size`, the blend handed to the next shallower
        level): a blend of another size than the teacher's map is nearest-resized to it before the 3x3 conv."""
        blend = self.reduce(student)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=blend.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([blend, deeper], dim=1))
            blend = blend * weights[:, :1] + deeper * weights[:, 1:]
        if blend.shape[-2:] != size:
            blend = F.interpolate(blend, size=size, mode="nearest")
        return self.project(blend), blend


def hierarchical_context_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE of two (B, C, H, W) maps at full resolution and average-pooled to 4x4, 2x2, 1x1 (the sizes
    below the map's), weighted 1, 1/2, 1/4, ... and normalised by the sum of the weights."""
    total, weights, weight = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= min(student.shape[-2:]):
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
        total = total + weight * F.mse_loss(*pooled)
        weights += weight
    return total / weights


def _as_map(feature: Tensor) -> Tensor:
    """A (B, C) pooled feature as a (B, C, 1, 1) map; a map as it is."""
    return feature.reshape(*feature.shape, 1, 1) if feature.dim() == 2 else feature


@LOSSES.register("reviewkd")
class ReviewKD(Method):
    """weight * warm-up * HCL between attention-fused student levels (stages + pooled) and the teacher's
    (pre-activation stages + pooled)."""

    def __init__(self, weight: float = 5.0, warmup_epochs: int = 20):
        super().__init__()
        non_negative("loss.weight", weight)
        non_negative("loss.warmup_epochs", warmup_epochs)
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        self.student_points, self.teacher_points = ("stages", "pooled"), ("preacts", "pooled")

    def setup(self, context: MethodContext) -> None:
        # deepest level first: the order the fusion runs in
        self.levels = [("pooled", "pooled"), *reversed(stage_pairs(context.student, context.teacher, teacher_prefix=PREACT))]
        shared = min(MAX_SHARED_WIDTH, context.student["pooled"][0])
        self.fusions = nn.ModuleList(
            AttentionFusion(context.student[s][0], shared, context.teacher[t][0], fuse=depth > 0)
            for depth, (s, t) in enumerate(self.levels)
        )

    def forward(self, student, teacher, batch, epoch):
        total, blend = 0.0, None
        for (student_point, teacher_point), fusion in zip(self.levels, self.fusions):
            target = _as_map(teacher.features[teacher_point])
            output, blend = fusion(_as_map(student.features[student_point].float()), blend, target.shape[-2:])
            total = total + hierarchical_context_loss(output.float(), target.float())
        warm_up = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return {"reviewkd": self.weight * warm_up * total}
