"""MLKD (Jin, Wang and Lin 2023, "Multi-Level Logit Distillation", CVPR): the student's predictions matched
to the teacher's at three levels and several temperatures. With P = softmax(logits / T) (batch x classes),
B samples and C classes, for each T in `temperatures`:

    instance = T^2 * mean_i KL(P^tea_i || P^stu_i)                          (Hinton KD at T)
    class    = || P^tea^T P^tea - P^stu^T P^stu ||_F^2 / C                 (C x C class correlations)
    batch    = || P^tea P^tea^T - P^stu P^stu^T ||_F^2 / B                 (B x B sample correlations)

each times `weight`, and the instance and batch terms times the share of the batch whose teacher
confidence (max softmax at T = 1) is at or below the batch median, the class term times the share of the
classes whose summed teacher probability is at or below the median. This is what the authors' released
code computes (Jin-Ying/Multi-Level-Logit-Distillation `mdistiller/distillers/KD_ours.py`): its masks
multiply batch-mean terms (its `reduce=False` is commented out), so each masked term is scaled by the
masked share (about 1/2) rather than restricted to the masked samples.

Augmentation: the authors train on a weak and a strong (RandAugment) view of every image and add unmasked
KD and class terms on the strong view, and CE on both. Only one view is supported here: the training
batch (`dataset.augment`: crop and flip, the weak view); the strong-view terms are left out, so this is
MLKD's weak-view objective, not the published recipe. Defaults: temperatures 2..6, weight 0.9 (its
KD_WEIGHT), CE weight 0.1 (the authors': 0.1 on each of the two views).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LOSSES
from .base import Method, kd_loss, non_negative, positive, require


def share_at_or_below_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` at or below their median (linear interpolation, as numpy's percentile 50)."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


def correlation_gap(student_p: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    """|| teacher_p teacher_p^T - student_p student_p^T ||_F^2 / rows: the gap of the row-by-row Gram matrices."""
    gap = teacher_p @ teacher_p.t() - student_p @ student_p.t()
    return gap.pow(2).sum() / student_p.shape[0]


@LOSSES.register("mlkd")
class MLKD(Method):
    """Multi-level logits: instance (KD), class and batch correlations at several T, confidence-masked."""

    reads_logits = True

    def __init__(self, weight: float = 0.9, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)):
        super().__init__()
        non_negative("loss.weight", weight)
        require(len(temperatures) > 0, "loss.temperatures", "must list at least one temperature")
        for T in temperatures:
            positive("loss.temperatures", T)
        self.weight = weight
        self.temperatures = tuple(float(T) for T in temperatures)

    def forward(self, student, teacher, batch, epoch):
        s, t = student.logits.float(), teacher.logits.float()
        p_teacher = F.softmax(t, 1)
        sample_share = share_at_or_below_median(p_teacher.max(1).values)
        class_share = share_at_or_below_median(p_teacher.sum(0))
        instance = class_level = batch_level = 0.0
        for T in self.temperatures:
            ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
            instance = instance + kd_loss(s, t, T)
            class_level = class_level + correlation_gap(ps.t(), pt.t())
            batch_level = batch_level + correlation_gap(ps, pt)
        return {
            "mlkd_instance": self.weight * sample_share * instance,
            "mlkd_class": self.weight * class_share * class_level,
            "mlkd_batch": self.weight * sample_share * batch_level,
        }
