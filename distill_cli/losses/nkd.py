"""NKD (Yang, Zeng, Li, Zhang, Yuan and Li 2023, "From Knowledge Distillation to Self-Knowledge Distillation:
A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV): the KD loss split at the target
class, its non-target part normalised. With t the label, p the softmaxes and tau the temperature,

    target     = -mean_i p^tea_t * log p^stu_t                                  (tau = 1)
    non-target = -gamma * tau^2 * mean_i sum_{c != t} q^tea_c * log q^stu_c       (q: softmax at tau over
                                                                                  the classes != t only)

as the authors' `NKDLoss` (yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py`): cross-entropies, not KL (they
differ by the teacher's entropy, constant for the student), the teacher's target probability detached.
Defaults as there: tau 1, gamma 1.5, with the student's CE at weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import LOSSES
from .base import Method, non_negative, non_target, positive


@LOSSES.register("nkd")
class NKD(Method):
    """Normalized KD: teacher-weighted target log-probability + gamma * CE of the renormalised non-targets."""

    reads_logits = True

    def __init__(self, gamma: float = 1.5, temperature: float = 1.0):
        super().__init__()
        non_negative("loss.gamma", gamma)
        positive("loss.temperature", temperature)
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, student, teacher, batch, epoch):
        s, t = student.logits.float(), teacher.logits.float()
        label = batch.labels[:, None]
        target_log_p = F.log_softmax(s, 1).gather(1, label)
        target_p_teacher = F.softmax(t, 1).gather(1, label)
        target = -(target_p_teacher * target_log_p).mean()
        s_rest, t_rest = non_target(s, batch.labels), non_target(t, batch.labels)
        T = self.temperature
        cross = (F.softmax(t_rest / T, 1) * F.log_softmax(s_rest / T, 1)).sum(1).mean()
        return {"nkd_target": target, "nkd_non_target": -self.gamma * T * T * cross}
