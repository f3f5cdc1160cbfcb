"""L2 on the pooled features, plain and prime-aware (Zhang et al. 2020, "Prime-Aware Adaptive Distillation", PAD),
as torchdistill runs them for ImageNet (its `MSELoss` on `avgpool` and `PADL2Loss` + `VarianceBranch4PAD`).

With f_s, f_t the student's and teacher's pooled features (the classifiers' inputs):

    l2     = weight * mean over (b, d) of (f_s - f_t)^2
    pad_l2 = weight * mean over (b, d) of (f_s - f_t)^2 / (eps + exp(log v)) + log v,    log v = BN(Linear(f_s))

PAD has the student predict a variance for each sample and dimension: where it is large (a sample the student finds
hard) the squared error counts less, and the log v term keeps it from growing without end. It is a second stage:
torchdistill trains resnet18 from resnet34 with CE + l2 (weight 15, 90 epochs: 71.08%), then 30 epochs of pad_l2
from that student (weight 1, lr 0.002: 71.71%; docs/methods.md). Where the two widths differ (torchdistill takes equal
widths), f_s first goes through a linear layer to the teacher's width, and the variance branch, which reads f_s as
the student gives it, predicts the teacher's width of variances.
"""

from __future__ import annotations

import torch
from torch import nn

from . import LOSSES
from .base import Method, MethodContext, non_negative


@LOSSES.register("l2")
class PooledL2(Method):
    """Mean squared error between the student's pooled feature and the teacher's."""

    def __init__(self, weight: float = 15.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("pooled",)

    def setup(self, context: MethodContext) -> None:
        student_width, teacher_width = context.student["pooled"][0], context.teacher["pooled"][0]
        self.embed = nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()

    def differences(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_s as the student gives it, (f_s embedded - f_t)^2), both (B, D) in fp32."""
        feature = student.features["pooled"].float().flatten(1)
        return feature, (self.embed(feature).float() - teacher.features["pooled"].float().flatten(1)) ** 2

    def forward(self, student, teacher, batch, epoch):
        return {"l2": self.weight * self.differences(student, teacher)[1].mean()}


@LOSSES.register("pad_l2")
class PrimeAwareL2(PooledL2):
    """L2 on the pooled features, each sample's dimensions weighted by a variance the student predicts (PAD)."""

    def __init__(self, weight: float = 1.0, eps: float = 1e-6):
        super().__init__(weight)
        non_negative("loss.eps", eps)
        self.eps = eps

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        student_width, teacher_width = context.student["pooled"][0], context.teacher["pooled"][0]
        self.variance = nn.Sequential(nn.Linear(student_width, teacher_width), nn.BatchNorm1d(teacher_width))  # log v

    def forward(self, student, teacher, batch, epoch):
        feature, squared = self.differences(student, teacher)
        log_variance = self.variance(feature).float()
        terms = squared / (self.eps + torch.exp(log_variance)) + log_variance
        return {"pad_l2": self.weight * terms.mean()}
