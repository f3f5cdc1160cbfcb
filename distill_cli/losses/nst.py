"""Neuron selectivity transfer (Huang and Wang 2017, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer"): the student matches the distribution of the teacher's neuron selectivity patterns,
measured by the squared maximum mean discrepancy with a polynomial kernel of degree 2.

Each channel's map, flattened over positions and L2-normalised, is one sample f_i; with
k(a, b) = (a . b)^2 each stage pair contributes

    MMD^2 = mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j)

(means over the batch and all channel pairs, so the two nets may have different channel counts), and
the term is weight * their sum. Defaults as mdistiller's `NST` config and RepDistiller's script: every
stage output after the stem, weight 50, CE weight 1. Nets with different stage counts pair their stages
from the deepest back; maps of different sizes: the larger is average-pooled to the smaller (as the peers).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import LOSSES
from .base import Method, match_size, non_negative, stage_pairs


def polynomial_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch and every (row of a, row of b) of (a_i . b_j)^2, for (B, N, D) and (B, M, D)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def selectivity_mmd(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared MMD (polynomial kernel, degree 2) between the L2-normalised channel maps of two
    (B, C, H, W) features of the same size."""
    s = F.normalize(student.flatten(2), dim=2)
    t = F.normalize(teacher.flatten(2), dim=2)
    return polynomial_kernel_mean(t, t) + polynomial_kernel_mean(s, s) - 2 * polynomial_kernel_mean(s, t)


@LOSSES.register("nst")
class NST(Method):
    """weight * sum over stage pairs of the polynomial-kernel MMD^2 between channel selectivity maps."""

    def __init__(self, weight: float = 50.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("stages",)

    def forward(self, student, teacher, batch, epoch):
        total = 0.0
        for student_stage, teacher_stage in stage_pairs(student.features, teacher.features):
            pair = match_size(student.features[student_stage].float(), teacher.features[teacher_stage].float())
            total = total + selectivity_mmd(*pair)
        return {"nst": self.weight * total}
