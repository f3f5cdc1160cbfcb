"""Logit matching (Ba and Caruana 2014, "Do Deep Nets Really Need to be Deep?"): the student regresses
the teacher's logits with a mean squared error, no temperature."""

from __future__ import annotations

import torch.nn.functional as F

from . import LOSSES
from .base import Method, non_negative


@LOSSES.register("mse_logits")
class LogitMatching(Method):
    """weight * mean over batch and classes of (student logit - teacher logit)^2."""

    reads_logits = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight

    def forward(self, student, teacher, batch, epoch):
        return {"mse_logits": self.weight * F.mse_loss(student.logits.float(), teacher.logits.float())}
