"""Variational information distillation (Ahn et al. 2019, "Variational Information Distillation for Knowledge
Transfer"): the student maximises a variational lower bound on the mutual information between its
features and the teacher's, i.e. it minimises the negative log-likelihood of each teacher feature map
under a Gaussian whose mean a regressor predicts from the student's map and whose variance is one
trainable number per teacher channel:

    vid = weight * sum over stage pairs of mean over (batch, c, h, w) of
          0.5 * ((t - mu(s))^2 / var_c + log var_c),    var_c = softplus(a_c) + eps

(the constant 0.5 log 2 pi dropped). Defaults as mdistiller's CIFAR-100 runs (the same as RepDistiller's):
every stage output, a regressor of 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv (no biases, the
teacher's channel count after the first conv), var_c initialised to 5, eps 1e-5, weight 1, CE weight 1.
Nets with different stage counts pair their stages from the deepest back; when two maps differ in size
the larger is average-pooled to the smaller before the regressor (as the peers).

Deliberate difference: mdistiller keeps the per-channel scales a_c in a plain Python list, so its optimizer
never sees them and its variances stay at their initial value; here they are a ParameterList, trained
with the student and saved in last.pt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import LOSSES
from .base import Method, MethodContext, match_size, non_negative, positive, require, stage_pairs


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


@LOSSES.register("vid")
class VID(Method):
    """weight * Gaussian NLL of each teacher stage map: mean regressed from the student's, trained variances."""

    def __init__(self, weight: float = 1.0, init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()
        non_negative("loss.weight", weight)
        positive("loss.eps", eps)
        positive("loss.init_variance", init_variance)
        require(init_variance > eps, "loss.init_variance", f"must be > loss.eps ({eps}), got {init_variance}")
        self.weight = weight
        self.init_variance = init_variance
        self.eps = eps
        self.student_points = self.teacher_points = ("stages",)

    def setup(self, context: MethodContext) -> None:
        self.pairs = stage_pairs(context.student, context.teacher)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        scale = math.log(math.expm1(self.init_variance - self.eps))  # softplus(scale) + eps = init_variance
        for student_point, teacher_point in self.pairs:
            source, target = context.student[student_point][0], context.teacher[teacher_point][0]
            self.regressors.append(
                nn.Sequential(
                    _conv1x1(source, target), nn.ReLU(), _conv1x1(target, target), nn.ReLU(), _conv1x1(target, target)
                )
            )
            self.log_scales.append(nn.Parameter(torch.full((target,), scale)))

    def forward(self, student, teacher, batch, epoch):
        total = 0.0
        for (student_point, teacher_point), regressor, log_scale in zip(self.pairs, self.regressors, self.log_scales):
            source, target = match_size(student.features[student_point].float(), teacher.features[teacher_point].float())
            mean = regressor(source).float()  # under autocast the regressor runs in its dtype
            variance = (F.softplus(log_scale) + self.eps).reshape(1, -1, 1, 1)
            total = total + (0.5 * ((mean - target.float()) ** 2 / variance + variance.log())).mean()
        return {"vid": self.weight * total}
