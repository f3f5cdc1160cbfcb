"""Decoupled Knowledge Distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR): the
Hinton KD term split into a target-class part and a non-target part, each with its own weight.

With p the softmax at temperature T and t the sample's label,

    TCKD = T^2 * KL([p_t^tea, 1 - p_t^tea] || [p_t^stu, 1 - p_t^stu])      (binary: target vs the rest)
    NCKD = T^2 * KL(p^tea over classes != t || p^stu over classes != t)   (each renormalised without t)
    DKD  = min(epoch / warmup, 1) * (tckd_weight * TCKD + nckd_weight * NCKD),   batch means

and Hinton KD = TCKD + (1 - p_t^tea) * NCKD: KD couples NCKD to the teacher's confidence, DKD frees it.
The paper's alpha and beta are `tckd_weight` and `nckd_weight` here (the top-level `alpha` is the
Hinton term's weight, as for every method). Defaults as mdistiller's `DKD` config: weights 1 and 8,
T=4, a linear warm-up over 20 epochs (epochs count from 1, so epoch 1 already has weight 1/20), CE
weight 1.

Deliberate differences from mdistiller (same values in exact arithmetic): every log-probability comes
from a log-softmax (mdistiller takes the log of a softmax, which is -inf once a probability underflows),
and the non-target distribution drops the target column instead of subtracting 1000 from its logit.
NCKD needs at least two non-target classes, so a dataset with fewer than 3 classes is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LOSSES
from .base import Method, MethodContext, non_negative, non_target, positive, require


def decoupled_kd(student_logits, teacher_logits, labels, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) at temperature T, batch means, each times T^2 (unweighted, no warm-up)."""
    student, teacher = student_logits.float() / T, teacher_logits.float() / T
    label = labels[:, None]
    student_rest, teacher_rest = non_target(student, labels), non_target(teacher, labels)
    student_total, teacher_total = student.logsumexp(1), teacher.logsumexp(1)
    # log [p_t, 1 - p_t]: the target logit, and the log-sum-exp of the others, minus the log of the total
    student_binary = torch.stack([student.gather(1, label)[:, 0], student_rest.logsumexp(1)], 1) - student_total[:, None]
    teacher_binary = torch.stack([teacher.gather(1, label)[:, 0], teacher_rest.logsumexp(1)], 1) - teacher_total[:, None]
    tckd = F.kl_div(student_binary, teacher_binary, reduction="batchmean", log_target=True)
    nckd = F.kl_div(
        F.log_softmax(student_rest, 1), F.log_softmax(teacher_rest, 1), reduction="batchmean", log_target=True
    )
    return tckd * T * T, nckd * T * T


@LOSSES.register("dkd")
class DKD(Method):
    """Decoupled KD: weighted target-class (TCKD) and non-target-class (NCKD) KL terms, warmed up."""

    reads_logits = True

    def __init__(self, tckd_weight: float = 1.0, nckd_weight: float = 8.0, temperature: float = 4.0, warmup: int = 20):
        super().__init__()
        non_negative("loss.tckd_weight", tckd_weight)
        non_negative("loss.nckd_weight", nckd_weight)
        positive("loss.temperature", temperature)
        require(warmup >= 0, "loss.warmup", f"must be a number of epochs >= 0, got {warmup}")
        self.tckd_weight = tckd_weight
        self.nckd_weight = nckd_weight
        self.temperature = temperature
        self.warmup = warmup

    def setup(self, context: MethodContext) -> None:
        require(
            context.num_classes >= 3,
            "loss=dkd",
            f"dataset={context.dataset} has {context.num_classes} classes; the non-target term (NCKD) needs "
            "at least 3 (use loss=kd)",
        )

    def forward(self, student, teacher, batch, epoch):
        tckd, nckd = decoupled_kd(student.logits, teacher.logits, batch.labels, self.temperature)
        ramp = min(epoch / self.warmup, 1.0) if self.warmup else 1.0
        return {"dkd_tckd": ramp * self.tckd_weight * tckd, "dkd_nckd": ramp * self.nckd_weight * nckd}
