"""Factor transfer (Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", FT): a paraphraser, an autoencoder trained first to reconstruct the teacher's last stage, gives
the teacher's "factor" (its encoder's output); a translator on the student's last stage learns to match it.

With F_T the paraphraser's encoding of the teacher's last stage and F_S the translator's output, each
flattened per sample and divided by its L2 norm, the term is

    ft = weight * mean over the batch and the entries of |F_T / ||F_T|| - F_S / ||F_S|| |^p

(the paper's p-norm with p = 1, averaged over entries as the authors' code does with L1Loss). Before
distillation the paraphraser trains alone for `init_epochs` on the mean squared reconstruction error of the
teacher's last stage, at a constant lr `init_lr` (RepDistiller's 0.01 for its ResNet and WRN students, on
`init_epochs` 30); it is then frozen. Defaults as RepDistiller (`train_student.py --distill factor -b 200`,
`models/util.py`): rate 0.5 (factor channels = half the teacher's), a paraphraser of three 3x3 convs (and
three transposed ones back) with LeakyReLU(0.1) and no BatchNorm, a translator of three 3x3 convs with
BatchNorm and LeakyReLU(0.1), weight 200, CE weight 1. Where the last stages differ in size the larger is
average-pooled to the smaller. RepDistiller's own loss differs from the paper's: it compares the normalised
channel-mean of the squared factors (`FactorTransfer(p1=2)`), an attention map of the factor.
"""

from __future__ import annotations

from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import stage_points
from . import LOSSES
from .base import Method, MethodContext, Stage, match_size, non_negative, positive, require

SLOPE = 0.1  # the LeakyReLU of the paraphraser and translator, as the authors


def conv_block(conv: type[nn.Module], channels: list[int], batch_norm: bool) -> nn.Sequential:
    """3x3 (transposed) convolutions `channels[i]` -> `channels[i + 1]` at the same size, each followed by
    BatchNorm (with `batch_norm`) and LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for in_channels, out_channels in pairwise(channels):
        layers.append(conv(in_channels, out_channels, 3, 1, 1))
        layers += [nn.BatchNorm2d(out_channels)] if batch_norm else []
        layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The autoencoder of the teacher's map: `encoder` gives the factor (C -> C -> k -> k channels),
    `decoder` the reconstruction (k -> k -> C -> C)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = conv_block(nn.Conv2d, [channels, channels, factor_channels, factor_channels], batch_norm=False)
        self.decoder = conv_block(nn.ConvTranspose2d, [factor_channels, factor_channels, channels, channels], batch_norm=False)

    def forward(self, feature: Tensor) -> Tensor:
        return self.decoder(self.encoder(feature))


def factor(feature: Tensor) -> Tensor:
    """(B, C*H*W): each sample's map flattened and divided by its L2 norm."""
    return F.normalize(feature.flatten(1), dim=1)


@LOSSES.register("ft")
class FactorTransfer(Method):
    """weight * mean |normalised paraphrased teacher factor - normalised translated student factor|^p (last stages)."""

    pretrains = True

    def __init__(self, weight: float = 200.0, p: int = 1, rate: float = 0.5, init_epochs: int = 30, init_lr: float = 0.01):
        super().__init__()
        non_negative("loss.weight", weight)
        require(p in (1, 2), "loss.p", f"must be 1 or 2, got {p}")
        require(0 < rate <= 1, "loss.rate", f"must be in (0, 1], got {rate}")
        require(init_epochs >= 0, "loss.init_epochs", f"must be >= 0, got {init_epochs}")
        positive("loss.init_lr", init_lr)
        self.weight, self.p, self.rate, self.init_epochs, self.init_lr = weight, p, rate, init_epochs, init_lr
        self.student_points = self.teacher_points = ("last_stage",)

    def setup(self, context: MethodContext) -> None:
        self.student_point, self.teacher_point = stage_points(context.student)[-1], stage_points(context.teacher)[-1]
        channels = context.teacher[self.teacher_point][0]
        factor_channels = int(channels * self.rate)
        require(factor_channels >= 1, "loss.rate", f"{self.rate} of the teacher's {channels} channels leaves no factor channel")
        self.paraphraser = Paraphraser(channels, factor_channels).requires_grad_(False)  # trained in the stage only
        student_channels = context.student[self.student_point][0]
        self.translator = conv_block(nn.Conv2d, [student_channels, student_channels, factor_channels, factor_channels], batch_norm=True)

    def stage(self) -> Stage | None:
        if self.init_epochs == 0:
            return None
        return Stage(self.init_epochs, self.paraphraser, self.reconstruction, lr=self.init_lr)

    def reconstruction(self, student, teacher, batch, epoch) -> dict[str, Tensor]:
        """The stage's term: the paraphraser's mean squared reconstruction error of the teacher's map."""
        target = teacher.features[self.teacher_point].float()
        return {"ft_reconstruction": F.mse_loss(self.paraphraser(target).float(), target)}

    def forward(self, student, teacher, batch, epoch):
        translated = self.translator(student.features[self.student_point].float()).float()
        paraphrased = self.paraphraser.encoder(teacher.features[self.teacher_point].float()).float()
        translated, paraphrased = match_size(translated, paraphrased)
        return {"ft": self.weight * (factor(paraphrased) - factor(translated)).abs().pow(self.p).mean()}
