"""FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): the student's hint layer, through a
trainable connector, regresses the teacher's guided layer with a mean squared error.

Defaults as mdistiller's CIFAR-100 runs: the hint is the second stage's output, weight 100, one training
stage (neither mdistiller nor RepDistiller runs the paper's separate hint pre-training stage). The
connector is the peers' convolutional regressor (RepDistiller's and mdistiller's `ConvReg`), a conv chosen
by the two maps' sizes, then BatchNorm + ReLU to the teacher's channel count (the teacher's feature is a
ReLU output):

    student map twice the teacher's      3x3 conv, stride 2, padding 1
    student map half the teacher's       4x4 transposed conv, stride 2, padding 1
    student map at least the teacher's   a valid conv of kernel (1 + sH - tH, 1 + sW - tW) (1x1 when equal)
    otherwise                            refused before training, naming both sizes

The peers choose by the height alone (their maps are square); here both sides must fit the rule. The
convs carry no bias (the BatchNorm after them cancels it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DistillError
from . import LOSSES
from .base import Method, MethodContext, non_negative, require


def rectified(conv: nn.Module, channels: int) -> nn.Sequential:
    """`conv` -> BatchNorm -> ReLU, `channels` the conv's output channels."""
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


def conv_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv -> BatchNorm -> ReLU: a student feature map with the teacher's channel count."""
    return rectified(nn.Conv2d(in_channels, out_channels, 1, bias=False), out_channels)


def hint_regressor(student: torch.Size, teacher: torch.Size) -> nn.Sequential | None:
    """The connector mapping a (C, H, W) student map to the teacher's (C, H, W) (see the module's
    docstring), or None where no conv of the rule maps the student's size to the teacher's."""
    (channels, *size), (out, *target) = student, teacher
    if size == [2 * t for t in target]:
        conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
    elif [2 * s for s in size] == target:
        conv = nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1, bias=False)
    elif all(s >= t for s, t in zip(size, target)):
        conv = nn.Conv2d(channels, out, tuple(1 + s - t for s, t in zip(size, target)), bias=False)
    else:
        return None
    return rectified(conv, out)


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
        student, teacher = context.student[self.hint], context.teacher[self.hint]
        connector = hint_regressor(student, teacher)
        if connector is None:
            raise DistillError(
                f"loss=fitnet: no connector maps the student's {self.hint} {tuple(student)} to the teacher's "
                f"{tuple(teacher)} (the student's map must be twice, half, or at least the teacher's height and "
                "width); choose another loss.hint"
            )
        self.connector = connector

    def forward(self, student, teacher, batch, epoch):
        hint = self.connector(student.features[self.hint].float())
        return {"fitnet": self.weight * F.mse_loss(hint.float(), teacher.features[self.hint].float())}
