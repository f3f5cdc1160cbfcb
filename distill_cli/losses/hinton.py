"""Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

`alpha` weights the soft (teacher) term, as in the paper, RepDistiller and mdistiller;
torchdistill's `alpha` weights the CE term instead. Both distributions come from log-softmax
(no log of a softmax), the KL is averaged over the batch, and the T^2 factor keeps the soft
term's gradient magnitude roughly independent of T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import LOSSES


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, in fp32."""
    log_p_student = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


@LOSSES.register("kd")
class HintonKD(nn.Module):
    def __init__(self, T: float, alpha: float):
        super().__init__()
        self.T = T
        self.alpha = alpha

    def forward(self, student_logits, teacher_logits, targets) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(student_logits.float(), targets)
        if self.alpha == 0:
            return {"loss": ce, "ce": ce}
        kd = kd_loss(student_logits, teacher_logits, self.T)
        total = kd if self.alpha == 1 else self.alpha * kd + (1 - self.alpha) * ce
        return {"loss": total, "ce": ce, "kd": kd}
