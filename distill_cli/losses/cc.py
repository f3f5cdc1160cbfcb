"""Correlation congruence (Peng et al. 2019, "Correlation Congruence for Knowledge Distillation",
arXiv:1904.01802), as RepDistiller implements it.

The paper matches the n x n correlation matrices of a batch's embeddings, L = ||psi(F_t) - psi(F_s)||^2 / n^2
with psi(F)_ij = k(f_i, f_j) and k a Gaussian RBF kernel approximated by its Taylor series. RepDistiller's
`Correlation` computes something else (code the paper's authors sent its maintainer as "almost as good as
their full version on CIFAR"; he never had the full version: RepDistiller #15), and the published CIFAR-100
CC numbers (the CRD paper's tables, weight 0.02) come from it: both nets' pooled features go through a
trainable linear embedding (no normalisation) and, with r_i = |e_s(f_s_i) - e_t(f_t_i)| the element-wise
absolute residual of sample i,

    L = weight * mean_{i=1..n-1} sum_d r_i[d] * r_{i+1}[d]

i.e. no kernel and no n x n matrices: only the n - 1 adjacent pairs of the batch (in its shuffled order),
each compared through the product of the two samples' residuals. It is zero whenever the two embeddings
agree on every sample, so it pulls each sample's student embedding towards the teacher's (an
instance-level match) rather than matching relations between samples. We reproduce it exactly (defaults:
weight 0.02, embedding dimension 128 = RepDistiller's `feat_dim`), since that is what the published numbers
measure. Both embeddings are trained, as in RepDistiller, so the term can also be lowered by shrinking both.
"""

from __future__ import annotations

import torch
from torch import nn

from . import LOSSES
from .base import Method, MethodContext, non_negative, positive


@LOSSES.register("cc")
class CorrelationCongruence(Method):
    """weight * mean over adjacent batch pairs of the dot product of their |linear embedding residuals|."""

    min_batch = 2  # adjacent pairs of the batch: one sample has none

    def __init__(self, weight: float = 0.02, embed_dim: int = 128):
        super().__init__()
        non_negative("loss.weight", weight)
        positive("loss.embed_dim", embed_dim)
        self.weight = weight
        self.embed_dim = embed_dim
        self.student_points = self.teacher_points = ("pooled",)

    def setup(self, context: MethodContext) -> None:
        self.embed_student = nn.Linear(context.student["pooled"].numel(), self.embed_dim)
        self.embed_teacher = nn.Linear(context.teacher["pooled"].numel(), self.embed_dim)

    def forward(self, student, teacher, batch, epoch):
        student_pooled, teacher_pooled = student.features["pooled"], teacher.features["pooled"]
        with torch.autocast(student_pooled.device.type, enabled=False):
            embedded_student = self.embed_student(student_pooled.float().flatten(1))
            residual = (embedded_student - self.embed_teacher(teacher_pooled.float().flatten(1))).abs()
            return {"cc": self.weight * (residual[:-1] * residual[1:]).sum(1).mean()}
