"""Overhaul of feature distillation (Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation",
OFD): the student's pre-ReLU stage outputs, through a connector (1x1 conv + BatchNorm), regress the
teacher's pre-ReLU outputs with a partial L2 distance that ignores what the teacher's ReLU would discard.

Per channel c of a teacher stage, the margin m_c is the mean of the teacher's negative pre-activations,
assuming they follow the Gaussian of the BatchNorm that makes them (scale s = |gamma_c|, shift mu = beta_c):
m_c = mu - s phi(mu/s) / Phi(-mu/s), or -3 s where Phi(-mu/s) <= 0.001. With t' = max(t, m_c) the distance
at each position is (s - t')^2 where s > t' or t' > 0, else 0, and

    ofd = weight * sum over stage pairs i = 1..n of (sum over (c, h, w), mean over the batch) / 2^(n - i)

Defaults as mdistiller's `OFD` config (after the authors' CIFAR code): every stage, weight 0.001, a 1x1
connector, CE weight 1. Pre-ReLU points are the `preactN` feature points (the input of the ReLU that ends
each stage, an in-place ReLU run out of place in the extractor; for WRN's pre-activation blocks the output
of the next BatchNorm before its ReLU, as the authors); a net without them (MobileNetV2's linear
bottlenecks) is refused in one line, and so is a teacher whose pre-ReLU output is made by no BatchNorm. Nets with different stage
counts pair their stages from the deepest back; maps of different sizes: the larger is average-pooled to
the smaller (mdistiller pools the teacher's to the student's size).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.errors import DistillError
from ..models.features import PREACT, preact_batch_norms
from . import LOSSES
from .base import Method, MethodContext, match_size, non_negative, stage_pairs

RARE = 1e-3  # below this probability of a negative pre-activation, the margin is -3 standard deviations


def margin_from_batch_norm(batch_norm: nn.BatchNorm2d) -> Tensor:
    """(C,): the expected value of each channel's output given that it is negative, for the Gaussian of
    mean beta and standard deviation |gamma| the BatchNorm makes."""
    std, mean = batch_norm.weight.detach().double().abs(), batch_norm.bias.detach().double()
    negative = torch.special.ndtr(-mean / std)
    density = torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi)
    truncated = mean - std * density / negative
    return torch.where(negative > RARE, truncated, -3 * std).float()


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Sum over (c, h, w) of the batch mean of (student - max(teacher, margin))^2, counted where the
    student is above that target or the target is positive; `margin` broadcasts over channels."""
    target = torch.maximum(teacher, margin.reshape(1, -1, 1, 1))
    mask = (student > target) | (target > 0)
    return ((student - target).pow(2) * mask).mean(dim=0).sum()


@LOSSES.register("ofd")
class OFD(Method):
    """weight * partial L2 between connected student pre-ReLU stages and the teacher's, margins from its BatchNorms."""

    def __init__(self, weight: float = 0.001):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("preacts",)

    def setup(self, context: MethodContext) -> None:
        self.pairs = stage_pairs(context.student, context.teacher, prefix=PREACT)
        batch_norms = preact_batch_norms(context.teacher_network, context.info)
        self.connectors = nn.ModuleList()
        for index, (student_point, teacher_point) in enumerate(self.pairs):
            batch_norm = batch_norms.get(teacher_point)
            channels = context.teacher[teacher_point][0]
            if batch_norm is None or batch_norm.num_features != channels:
                raise DistillError(
                    f"loss=ofd: the teacher's {teacher_point} (its stage output before the ReLU) is made by no "
                    "BatchNorm of its channels, so there are no statistics for its margin"
                )
            self.register_buffer(f"margin{index}", margin_from_batch_norm(batch_norm))
            connector = nn.Sequential(
                nn.Conv2d(context.student[student_point][0], channels, 1, bias=False), nn.BatchNorm2d(channels)
            )
            nn.init.normal_(connector[0].weight, 0.0, math.sqrt(2.0 / channels))  # as the authors
            self.connectors.append(connector)

    def forward(self, student, teacher, batch, epoch):
        total, count = 0.0, len(self.pairs)
        for index, ((student_point, teacher_point), connector) in enumerate(zip(self.pairs, self.connectors)):
            connected = connector(student.features[student_point].float()).float()
            pair = match_size(connected, teacher.features[teacher_point].float())
            total = total + partial_l2(*pair, getattr(self, f"margin{index}")) / 2 ** (count - 1 - index)
        return {"ofd": self.weight * total}
