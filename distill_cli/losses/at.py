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

from . import LOSSES
from .base import Method, match_size, non_negative, positive, stage_pairs


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
        for student_stage, teacher_stage in stage_pairs(student.features, teacher.features):
            student_feature, teacher_feature = match_size(
                student.features[student_stage].float(), teacher.features[teacher_stage].float()
            )
            total += (attention_map(student_feature, self.p) - attention_map(teacher_feature, self.p)).pow(2).mean()
        return {"at": self.weight * total}
