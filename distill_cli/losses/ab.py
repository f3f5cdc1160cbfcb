"""Activation boundaries (Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons", AB): before distillation the student learns where the teacher's neurons switch
on, by a hinge-like loss on its pre-ReLU stage outputs that only looks at the sign of the teacher's.

For each stage pair, with s the connected student pre-activation and t the teacher's, margin m:

    d(s, t) = sum over (c, h, w) of (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]

and the stage's term is weight * 2^(i - n) * (the batch mean of d) for the pairs i = 1..n, shallow to deep
(the deepest counts 1, each earlier one half the next). The stage trains the student (every layer its
pre-activations reach; the classifier gets no gradient) and the connectors on this term alone for
`init_epochs` at the run's `optimizer.lr`, held constant; distillation then adds no term of its own (CE,
and the Hinton term with alpha > 0), as RepDistiller runs it. Defaults as RepDistiller
(`distiller_zoo/AB.py`, `helper/pretrain.py`, `train_student.py --distill abound`): margin 1, the sum
divided by the batch size and by 1000 and times 3 (weight 0.003), 30 epochs. A connector is the identity
where the channel counts agree, else a 1x1 conv + BatchNorm to the teacher's channels (RepDistiller's for
maps of one size); maps of different sizes: the larger is average-pooled to the smaller, as for the
other stage methods. Pre-ReLU points are the `preactN` feature points (see `ofd`); a net without them
(MobileNetV2) is refused in one line. RepDistiller keeps the student in eval mode during the stage (its
BatchNorms then use their initial statistics); here it trains in train mode, as every training here.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models.features import PREACT
from . import LOSSES
from .base import Method, MethodContext, Stage, match_size, non_negative, require, stage_pairs


def boundary_distance(student: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """The batch mean of d(s, t): sum over (c, h, w) of the squared distance to the margin on the side of
    zero the teacher's neuron is on, where the student is not past it."""
    off = (student + margin).pow(2) * ((student > -margin) & (teacher <= 0))
    on = (student - margin).pow(2) * ((student <= margin) & (teacher > 0))
    return (off + on).flatten(1).sum(1).mean()


@LOSSES.register("ab")
class ActivationBoundaries(Method):
    """weight * sum over stages of 2^(i - n) * activation-boundary distance, trained before distillation only."""

    pretrains = True

    def __init__(self, weight: float = 0.003, margin: float = 1.0, init_epochs: int = 30):
        super().__init__()
        non_negative("loss.weight", weight)
        non_negative("loss.margin", margin)
        require(init_epochs >= 0, "loss.init_epochs", f"must be >= 0, got {init_epochs}")
        self.weight, self.margin, self.init_epochs = weight, margin, init_epochs
        self.student_points = self.teacher_points = ("preacts",)

    def setup(self, context: MethodContext) -> None:
        self.pairs = stage_pairs(context.student, context.teacher, prefix=PREACT)
        self.connectors = nn.ModuleList()
        for student_point, teacher_point in self.pairs:
            student_channels, channels = context.student[student_point][0], context.teacher[teacher_point][0]
            same = student_channels == channels
            self.connectors.append(
                nn.Identity() if same else nn.Sequential(nn.Conv2d(student_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
            )
        self.connectors.requires_grad_(False)  # trained in the stage only

    def stage(self) -> Stage | None:
        if self.init_epochs == 0:
            return None
        return Stage(self.init_epochs, self.connectors, self.boundaries, trains_student=True)

    def boundaries(self, student, teacher, batch, epoch) -> dict[str, Tensor]:
        """The stage's term (see the module's docstring)."""
        total, count = 0.0, len(self.pairs)
        for index, ((student_point, teacher_point), connector) in enumerate(zip(self.pairs, self.connectors)):
            connected = connector(student.features[student_point].float()).float()
            pair = match_size(connected, teacher.features[teacher_point].float())
            total = total + boundary_distance(*pair, self.margin) / 2 ** (count - 1 - index)
        return {"ab": self.weight * total}

    def forward(self, student, teacher, batch, epoch):
        return {}
