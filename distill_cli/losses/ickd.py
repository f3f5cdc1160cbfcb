"""Inter-channel correlation (Liu et al. 2021, "Exploring Inter-Channel Correlation for Diversity-Preserved
Knowledge Distillation", ICKD-C): the student matches the teacher's correlations between channels.

The student's last stage output goes through an embedding (1x1 conv + BatchNorm) to the teacher's channel
count C; for each sample the channel Gram matrix G = F F^T of the (C, H*W) map has its rows L2-normalised,
and

    ickd = weight * sum over (b, i, j) of (G_student - G_teacher)^2 / (C * B)

(the two maps may differ in size: G is C x C). Defaults as the authors' CIFAR-100 script
(ADLab-AutoDrive/ICKD, `-a 0 -b 2.5`): the last stage output, weight 2.5, CE weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import stage_points
from . import LOSSES
from .base import Method, MethodContext, non_negative


def channel_correlation(feature: Tensor) -> Tensor:
    """(B, C, C): each sample's channel Gram matrix of a (B, C, H, W) map, rows L2-normalised."""
    flat = feature.flatten(2)
    return F.normalize(flat @ flat.transpose(1, 2), dim=2)


@LOSSES.register("ickd")
class ICKD(Method):
    """weight * squared difference of row-normalised channel Gram matrices (student embedded), per channel and sample."""

    def __init__(self, weight: float = 2.5):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("last_stage",)

    def setup(self, context: MethodContext) -> None:
        student_channels = context.student[stage_points(context.student)[-1]][0]
        teacher_channels = context.teacher[stage_points(context.teacher)[-1]][0]
        self.embed = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels)
        )

    def forward(self, student, teacher, batch, epoch):
        student_map = self.embed(student.features[stage_points(student.features)[-1]].float()).float()
        teacher_map = teacher.features[stage_points(teacher.features)[-1]].float()
        difference = channel_correlation(student_map) - channel_correlation(teacher_map)
        batch_size, channels = teacher_map.shape[:2]
        return {"ickd": self.weight * difference.pow(2).sum() / (channels * batch_size)}
