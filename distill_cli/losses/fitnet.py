"""FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): the student's hint layer, through a
trainable connector, regresses the teacher's guided layer with a mean squared error.

Defaults as mdistiller's CIFAR-100 runs: the hint is the second stage's output, weight 100, one training
stage (neither mdistiller nor RepDistiller runs the paper's separate hint pre-training stage). The
connector is a 1x1 convolution + BatchNorm + ReLU to the teacher's channel count (the teacher's feature
is a ReLU output); when the two maps differ in size the larger is average-pooled to the smaller.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import LOSSES
from .base import Method, MethodContext, non_negative, require


def match_size(student, teacher):
    """Average-pool the larger of two (B, C, H, W) maps to the other's height and width."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-1] > teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


def conv_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv -> BatchNorm -> ReLU: a student feature map with the teacher's channel count."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


@LOSSES.register("fitnet")
class FitNet(Method):
    """weight * MSE(connector(student hint), teacher hint); hint = a feature point of both nets."""

    def __init__(self, weight: float = 100.0, hint: str = "stage2"):
        super().__init__()
        non_negative("loss.weight", weight)
        require(hint.startswith("stage") or hint == "stem", "loss.hint", f"must be stem or stageN, got {hint!r}")
        self.weight = weight
        self.hint = hint
        self.student_points = self.teacher_points = (hint,)

    def setup(self, context: MethodContext) -> None:
        self.connector = conv_connector(context.student[self.hint][0], context.teacher[self.hint][0])

    def forward(self, student, teacher, batch, epoch):
        hint, guide = match_size(self.connector(student.features[self.hint].float()), teacher.features[self.hint].float())
        return {"fitnet": self.weight * F.mse_loss(hint.float(), guide.float())}
