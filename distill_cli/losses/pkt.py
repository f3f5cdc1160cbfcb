"""Probabilistic knowledge transfer (Passalis and Tefas 2018, "Learning Deep Representations with
Probabilistic Knowledge Transfer"): the student's embedding should give each sample the same
conditional distribution over its batch neighbours as the teacher's.

With c_ij the cosine similarity of the embeddings of samples i and j, k_ij = (c_ij + 1) / 2 in [0, 1]
and p_j|i = k_ij / sum_j k_ij (the pair i = i included, as in the authors' code), the term is
weight * mean over all (i, j) of p_j|i^tea * log((p_j|i^tea + eps) / (p_j|i^stu + eps)), eps = 1e-7:
the batch's summed KL divergence divided by B^2 (the scale the published weight is tuned for).
Defaults as mdistiller's `PKT` config: the pooled embedding (the classifier's input), weight 30000,
CE weight 1. The embeddings' widths need not match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LOSSES
from .base import Method, non_negative

EPS = 1e-7  # the authors' guard against log(0) for opposite embeddings (k_ij = 0)


def neighbour_distribution(embedding):
    """(B, B): row i is p_j|i, the cosine-similarity kernel (c + 1) / 2 normalised over j."""
    unit = F.normalize(embedding, dim=1, eps=EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(1, keepdim=True)


@LOSSES.register("pkt")
class PKT(Method):
    """weight * KL between the teacher's and student's cosine-kernel neighbour distributions in a batch."""

    min_batch = 2  # neighbours within the batch: one sample's distribution is always [1]

    def __init__(self, weight: float = 30000.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("pooled",)

    def forward(self, student, teacher, batch, epoch):
        p_student = neighbour_distribution(student.features["pooled"].float())
        p_teacher = neighbour_distribution(teacher.features["pooled"].float())
        divergence = p_teacher * torch.log((p_teacher + EPS) / (p_student + EPS))
        return {"pkt": self.weight * divergence.mean()}
