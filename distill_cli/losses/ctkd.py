"""CTKD (Li, Li, Yang, Zhao, Song, Luo, Li and Yang 2023, "Curriculum Temperature for Knowledge
Distillation", AAAI): the KD temperature is learned adversarially. A temperature module's output passes a
gradient reversal layer (identity forward, gradient times -lambda backward), so the module raises the KD
loss the student lowers; lambda grows along a cosine curriculum from 0 to `max_reversal` over
`curriculum_epochs` epochs:

    lambda(e) = max_reversal * (1 - cos(pi * min(e, E) / E)) / 2       (e: the epoch, from 1)
    tau       = min_temperature + temperature_range * sigmoid(GRL(x, lambda))
    CTKD      = weight * mean_i tau_i^2 * KL(softmax(t_i / tau_i) || softmax(s_i / tau_i))

`variant=global`: x is one learned scalar (initialised at 1, as the authors' `Global_T`), one tau for the
batch. `variant=instance`: x = MLP([t_i, s_i]) per sample (the logits detached: the student learns only
through the KD term); the authors' README gives the per-sample loss but not the module, so the MLP
(2C -> `hidden` -> 1, ReLU) is this implementation's choice. The module's parameters are trained by the
student's optimizer with the method's other parts (`Method` parameters).

Defaults as zhengli97/CTKD `scripts/run_cifar_distill.sh` and `train_student.py`: t_start 1, t_end 20,
cosine decay from 0 to -1 over 10 loops (epochs), KD weight 0.9, CE weight 0.1 (`loss.ce_weight`; alpha 0:
the fixed-T Hinton term would duplicate CTKD's).
The authors also weight-decay the temperature scalar: `optimizer.decay_all=true`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import LOSSES
from .base import Method, MethodContext, non_negative, positive, require


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (Ganin and Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x`, with its gradient multiplied by -`scale` on the way back."""
    return _ReverseGradient.apply(x, scale)


def reversal_scale(epoch: int, epochs: int, maximum: float) -> float:
    """The curriculum's lambda at `epoch` (from 1): a cosine rise from 0 to `maximum` over `epochs` epochs."""
    done = min(epoch, epochs) / epochs if epochs else 1.0
    return maximum * (1 - math.cos(math.pi * done)) / 2


@LOSSES.register("ctkd")
class CTKD(Method):
    """Curriculum temperature KD: KD at a temperature learned through gradient reversal (global or per sample)."""

    reads_logits = True
    VARIANTS = ("global", "instance")

    def __init__(
        self,
        weight: float = 0.9,
        variant: str = "global",
        min_temperature: float = 1.0,
        temperature_range: float = 20.0,
        curriculum_epochs: int = 10,
        max_reversal: float = 1.0,
        hidden: int = 256,
    ):
        super().__init__()
        non_negative("loss.weight", weight)
        require(variant in self.VARIANTS, "loss.variant", f"must be one of {', '.join(self.VARIANTS)}, got {variant!r}")
        positive("loss.min_temperature", min_temperature)
        non_negative("loss.temperature_range", temperature_range)
        require(curriculum_epochs >= 0, "loss.curriculum_epochs", f"must be a number of epochs >= 0, got {curriculum_epochs}")
        non_negative("loss.max_reversal", max_reversal)
        require(hidden >= 1, "loss.hidden", f"must be >= 1, got {hidden}")
        self.weight = weight
        self.variant = variant
        self.min_temperature = min_temperature
        self.temperature_range = temperature_range
        self.curriculum_epochs = curriculum_epochs
        self.max_reversal = max_reversal
        self.hidden = hidden
        self.temperature_module: nn.Module | None = None
        self.global_logit = nn.Parameter(torch.ones(1)) if variant == "global" else None

    def setup(self, context: MethodContext) -> None:
        if self.variant == "instance":
            classes = context.num_classes
            self.temperature_module = nn.Sequential(
                nn.Linear(2 * classes, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)
            )

    def temperatures(self, student_logits, teacher_logits, epoch: int) -> torch.Tensor:
        """The temperature of each sample, shape (batch, 1), through the gradient reversal of `epoch`."""
        if self.variant == "global":
            raw = self.global_logit.expand(student_logits.shape[0], 1)
        else:
            raw = self.temperature_module(torch.cat([teacher_logits, student_logits.detach()], 1))
        scale = reversal_scale(epoch, self.curriculum_epochs, self.max_reversal)
        return self.min_temperature + self.temperature_range * torch.sigmoid(reverse_gradient(raw.float(), scale))

    def forward(self, student, teacher, batch, epoch):
        s, t = student.logits.float(), teacher.logits.float()
        tau = self.temperatures(s, t, epoch)
        kl = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="none", log_target=True).sum(1)
        return {"ctkd": self.weight * (tau[:, 0] ** 2 * kl).mean()}
