"""Relational KD (Park et al. 2019, "Relational Knowledge Distillation"): the student's embeddings should
keep the teacher's distances between pairs of samples and angles within triplets of samples.

With e_i the embeddings of a batch, the distance term compares psi_D(i, j) = ||e_i - e_j|| / mu (mu the
mean distance over the pairs i != j) and the angle term psi_A(i, j, k) = cos of the angle at e_i between
e_j and e_k, both with the Huber (smooth L1, beta 1) loss averaged over all pairs / triplets (the
degenerate ones, i = j or i = k, have psi 0 in both nets). Both are invariant to scaling and moving the
embeddings, and the widths of the two embeddings need not match. Defaults as mdistiller's `RKD` config
(the authors' weights): the pooled embedding (the classifier's input), distance weight 25, angle weight
50, CE weight 1. Each term is returned on its own (`rkd_distance`, `rkd_angle`).

The angle term holds B x B x D pairwise differences and a B x B x B table, as the peers' code does: a run
whose batch would not fit the free memory is refused before training (`planned_memory`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LOSSES
from .base import Method, MethodContext, non_negative

EPS = 1e-12  # squared distances are clamped to it before the square root, so its gradient stays finite

# a step's (B, B, B) angle tables and (B, B, D) differences cost about 3 floats per entry at the peak of
# its forward and backward passes (measured: peak RSS on the CPU, B up to 384, D up to 1024 per net)
FLOATS_PER_ENTRY = 3


def relations(embedding) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, B) pairwise distances over their mean off the diagonal, (B, B, B) cosines [i, j, k] of the
    angle at sample i between samples j and k) of a (B, D) embedding."""
    differences = embedding[None, :, :] - embedding[:, None, :]  # [i, j] = e_j - e_i
    off_diagonal = ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    distances = differences.pow(2).sum(2).clamp_min(EPS).sqrt() * off_diagonal
    directions = F.normalize(differences, dim=2)
    pairs = len(embedding) * (len(embedding) - 1)  # the mean off the diagonal (zero on it), without a mask's shape
    return distances / (distances.sum() / pairs), directions @ directions.transpose(1, 2)


@LOSSES.register("rkd")
class RKD(Method):
    """Huber losses between the student's and teacher's normalised pairwise distances and triplet angles."""

    min_batch = 2  # distances between samples of the batch: one sample has none

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        non_negative("loss.distance_weight", distance_weight)
        non_negative("loss.angle_weight", angle_weight)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.student_points = self.teacher_points = ("pooled",)

    def planned_memory(self, context: MethodContext) -> dict[str, int]:
        """A step's angle tables (B^3 entries) and pairwise differences (B^2 x both embeddings' widths)."""
        batch, widths = context.batch_size, context.student["pooled"].numel() + context.teacher["pooled"].numel()
        entries = batch**2 * (batch + widths)
        what = f"a step's angles and distances of batch_size={batch} samples ({batch}^3 + {batch}^2 x {widths} entries)"
        return {what: entries * FLOATS_PER_ENTRY * 4}

    def forward(self, student, teacher, batch, epoch):
        student_distances, student_angles = relations(student.features["pooled"].float())
        teacher_distances, teacher_angles = relations(teacher.features["pooled"].float())
        return {
            "rkd_distance": self.distance_weight * F.smooth_l1_loss(student_distances, teacher_distances),
            "rkd_angle": self.angle_weight * F.smooth_l1_loss(student_angles, teacher_angles),
        }
