"""DIST (Huang, You, Wang, Qian and Xu 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS):
match the relations of the predictions, not their values. With Y_s, Y_t the (batch x classes) softmaxes at
temperature tau and rho the Pearson correlation,

    inter = 1 - mean over samples i of rho(Y_s[i, :], Y_t[i, :])     (the ranking of the classes per sample)
    intra = 1 - mean over classes c of rho(Y_s[:, c], Y_t[:, c])     (the ranking of the samples per class)
    DIST  = tau^2 * (beta * inter + gamma * intra)

as the authors' `DIST` loss (hunto/image_classification_sota `lib/models/losses/dist_kd.py`; the same
code in zkxufo/TTM `distiller_zoo/dist.py`), eps 1e-8 in the cosine's denominator. The intra-class
relation correlates the samples of a batch, so a batch needs at least 2. The code's defaults are
beta = gamma = tau = 1 (ImageNet); the paper's CIFAR-100 setting, the defaults here, is beta = gamma = 2,
tau = 4, CE weight 1.
"""

from __future__ import annotations

from torch import Tensor

from . import LOSSES
from .base import Method, non_negative, positive


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """The Pearson correlation of each row of `a` with the same row of `b` (the cosine of the centred rows)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOSSES.register("dist")
class DIST(Method):
    """DIST: inter-class and intra-class Pearson relations of the softmaxes at tau."""

    reads_logits = True
    min_batch = 2

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, tau: float = 4.0):
        super().__init__()
        non_negative("loss.beta", beta)
        non_negative("loss.gamma", gamma)
        positive("loss.tau", tau)
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def forward(self, student, teacher, batch, epoch):
        p_student = (student.logits.float() / self.tau).softmax(1)
        p_teacher = (teacher.logits.float() / self.tau).softmax(1)
        inter = 1 - pearson_rows(p_student, p_teacher).mean()
        intra = 1 - pearson_rows(p_student.t(), p_teacher.t()).mean()
        scale = self.tau * self.tau
        return {"dist_inter": scale * self.beta * inter, "dist_intra": scale * self.gamma * intra}
