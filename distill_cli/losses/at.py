"""Attention transfer (Zagoruyko and Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer"): the student matches the
teacher's spatial attention maps, stage by stage.

The attention map of a (B, C, H, W) feature is Q = mean over channels of |A|^p, flattened and L2
normalised per sample; each stage pair contributes mean((Q_student - Q_teacher)^2) over batch and
positions, and the term is weight * their sum. Defaults as mdistiller's `AT` config (after the authors'
code): p=2, weight 1000, every stage output after the stem, CE weight 1.

Nets with different stage counts are paired from the deepest stage back (the deepest stages carry the
attention that matters most, and the shallowest of the longer net is left out; the peers pair from the
first stage, which pairs a deep net's early stages with a shallow net's late ones). Maps of different
sizes: the larger feature is average-pooled to the smaller, as the peers do. |A|^p (the paper's form)
rather than the peers' A^p: the same for p=2 and for ReLU outputs, defined for any p.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..models.features import stage_points
from . import LOSSES
from .base import Method, MethodContext, non_negative, positive, require
from .fitnet import match_size


def stage_pairs(student_features: dict, teacher_features: dict) -> list[tuple]:
    """(student, teacher) stage features paired from the deepest stage back, as many as the shorter net has."""
    student = [student_features[point] for point in stage_points(student_features)]
    teacher = [teacher_features[point] for point in stage_points(teacher_features)]
    return list(zip(reversed(student), reversed(teacher)))


def attention_map(feature, p: float):
    """(B, H*W): the mean over channels of |feature|^p, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
class AttentionTransfer(Method):
    """weight * sum over stage pairs of the mean squared difference of L2-normalised attention maps."""

    def __init__(self, weight: float = 1000.0, p: float = 2.0):
        super().__init__()
        non_negative("loss.weight", weight)
        positive("loss.p", p)
        self.weight = weight
        self.p = p
        self.student_points = self.teacher_points = ("stages",)

    def forward(self, student, teacher, batch, epoch):
        total = 0.0
        for student_feature, teacher_feature in stage_pairs(student.features, teacher.features):
            student_feature, teacher_feature = match_size(student_feature.float(), teacher_feature.float())
            total += (attention_map(student_feature, self.p) - attention_map(teacher_feature, self.p)).pow(2).mean()
        return {"at": self.weight * total}
