"""Similarity-preserving KD (Tung and Mori 2019, "Similarity-Preserving Knowledge Distillation"): the
student's batch of activations should be as similar to each other as the teacher's are.

With F the last stage's feature of the batch flattened to (B, C*H*W), G = F F^T (B x B) with each row
L2-normalised; the term is weight * ||G_teacher - G_student||_F^2 / B^2. The feature's channels and
size need not match between the nets (G is B x B). Defaults as mdistiller's `SP` config (the authors'
code, which both peers follow): the last stage's output, weight 3000, CE weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..models.features import stage_points
from . import LOSSES
from .base import Method, non_negative


def similarity(feature):
    """(B, B): the batch's Gram matrix of flattened features, each row L2-normalised."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


@LOSSES.register("sp")
class SimilarityPreserving(Method):
    """weight * mean squared difference of the row-normalised batch Gram matrices of the last stages."""

    min_batch = 2  # similarities between samples of the batch: one sample's Gram matrix is always [1]

    def __init__(self, weight: float = 3000.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("last_stage",)

    def forward(self, student, teacher, batch, epoch):
        student_last = student.features[stage_points(student.features)[-1]].float()
        teacher_last = teacher.features[stage_points(teacher.features)[-1]].float()
        return {"sp": self.weight * (similarity(teacher_last) - similarity(student_last)).pow(2).mean()}
