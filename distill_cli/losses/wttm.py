"""WTTM (Zheng and Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR): the
student at temperature 1 matches the teacher's power-transformed distribution, each sample weighted by
the transform's normaliser. With p^tea the teacher's softmax and gamma < 1,

    p~_c = (p^tea_c)^gamma / Z,   Z = sum_c (p^tea_c)^gamma
    WTTM = weight * mean_i Z_i * KL(p~_i || softmax(s_i))

as the authors' `WTTM` loss (zkxufo/TTM `distiller_zoo/wttm.py`); a confident teacher (small Z) weighs
less. p~ is computed in the log domain (softmax of gamma * log_softmax), equal to the authors' powers.
Defaults: gamma 0.2 and weight 4 (their README's WTTM example: `--ttm_l 0.2 -a 4`, there with CRD; the
paper tunes gamma and the weight per pair), CE weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import LOSSES
from .base import Method, non_negative, positive


@LOSSES.register("wttm")
class WTTM(Method):
    """Weighted transformed teacher matching: KL to the teacher's softmax raised to gamma, weighted by its normaliser."""

    reads_logits = True

    def __init__(self, gamma: float = 0.2, weight: float = 4.0):
        super().__init__()
        positive("loss.gamma", gamma)
        non_negative("loss.weight", weight)
        self.gamma = gamma
        self.weight = weight

    def forward(self, student, teacher, batch, epoch):
        powered = self.gamma * F.log_softmax(teacher.logits.float(), 1)  # log (p^tea)^gamma
        log_norm = powered.logsumexp(1)
        log_target = powered - log_norm[:, None]
        kl = F.kl_div(F.log_softmax(student.logits.float(), 1), log_target, reduction="none", log_target=True).sum(1)
        return {"wttm": self.weight * (log_norm.exp() * kl).mean()}
