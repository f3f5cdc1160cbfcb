"""Tf-KD, the virtual teacher (Yuan, Tay, Li, Wang and Feng 2020, "Revisiting Knowledge Distillation via
Label Smoothing Regularization", CVPR: Tf-KD_reg): no teacher network. Each sample's teacher is a
hand-made distribution, `correct_prob` on its label and the rest spread evenly over the other classes,
softened by treating those probabilities as logits at temperature T:

    u_c  = correct_prob if c = y else (1 - correct_prob) / (C - 1)
    TfKD = weight * mean over samples and classes of softmax(u / T)_c * log(softmax(u / T)_c / softmax(s)_c)

as the authors' `loss_kd_regularization` (yuanli2333/Teacher-free-Knowledge-Distillation
`my_loss_function.py`): the student at temperature 1, PyTorch's `KLDivLoss()` mean over samples AND
classes, times their `multiplier`. Our `weight` is their reg_alpha x multiplier (0.1 x 100 here; their
per-model settings vary), and the CE weight (`loss.ce_weight`) 1 - reg_alpha = 0.9.
No teacher is built or trained: `alpha` must stay 0 (alpha > 0 would ask for a real teacher's Hinton term).
"""

from __future__ import annotations

import torch.nn.functional as F

from . import LOSSES
from .base import Method, MethodContext, non_negative, one_hot_rows, positive, require


@LOSSES.register("tfkd")
class TeacherFreeKD(Method):
    """Teacher-free KD: KL to a virtual teacher (correct_prob on the label, softened at T); no teacher network."""

    reads_logits = True
    needs_teacher = False

    def __init__(self, weight: float = 10.0, correct_prob: float = 0.99, temperature: float = 20.0):
        super().__init__()
        non_negative("loss.weight", weight)
        require(0 < correct_prob < 1, "loss.correct_prob", f"must lie in (0, 1), got {correct_prob}")
        positive("loss.temperature", temperature)
        self.weight = weight
        self.correct_prob = correct_prob
        self.temperature = temperature

    def setup(self, context: MethodContext) -> None:
        require(context.num_classes >= 2, "loss=tfkd", f"dataset={context.dataset} has {context.num_classes} class")

    def forward(self, student, teacher, batch, epoch):
        s = student.logits.float()
        classes = s.shape[1]
        rest = (1 - self.correct_prob) / (classes - 1)
        virtual = one_hot_rows(batch.labels, classes) * (self.correct_prob - rest) + rest
        log_target = F.log_softmax(virtual / self.temperature, 1)
        # the authors' KLDivLoss() mean: over samples and classes (written out: torch warns on reduction="mean")
        kl = F.kl_div(F.log_softmax(s, 1), log_target, reduction="sum", log_target=True) / s.numel()
        return {"tfkd": self.weight * kl}
