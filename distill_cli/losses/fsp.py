"""Flow of solution procedure (Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning"): the student matches the teacher's FSP matrices, the Gram
matrices between the channels of two consecutive stage outputs of a net:

    G[b, j, i] = mean over positions (h, w) of bottom[b, i, h, w] * top[b, j, h, w]

where the larger of the two maps is first average-pooled to the smaller's size (as the peers). Each
matrix pair contributes mean((G_student - G_teacher)^2) and the term is weight * their sum.

Defaults as RepDistiller's script (-a 0 -b 50): weight 50, CE weight 1. The flows are those between
consecutive stage outputs (the peers also take the stem's output -> first stage, which nets without a
stem lack); nets with different stage counts pair their flows from the deepest back. The paired
matrices must have the same shape, i.e. the paired stages the same channel counts (refused in one line
otherwise, as RepDistiller refuses). RepDistiller also runs a separate stage of FSP-only pre-training of
the student (30 epochs) before the main one; this trains both terms together from the start.
"""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor

from ..core.errors import DistillError
from ..models.features import stage_points
from . import LOSSES
from .base import Method, MethodContext, non_negative, stage_pairs


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """(B, C_top, C_bottom): the mean over positions of the products of the channels of two (B, C, H, W)
    maps, the larger average-pooled to the smaller's size first."""
    if bottom.shape[-1] > top.shape[-1]:
        bottom = F.adaptive_avg_pool2d(bottom, top.shape[-2:])
    elif top.shape[-1] > bottom.shape[-1]:
        top = F.adaptive_avg_pool2d(top, bottom.shape[-2:])
    return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / bottom[0, 0].numel()


def flows(stages: list[str]) -> list[tuple[str, str]]:
    """(bottom, top) names of consecutive stages."""
    return list(itertools.pairwise(stages))


@LOSSES.register("fsp")
class FSP(Method):
    """weight * sum over pairs of flows of the mean squared difference of FSP (Gram) matrices."""

    def __init__(self, weight: float = 50.0):
        super().__init__()
        non_negative("loss.weight", weight)
        self.weight = weight
        self.student_points = self.teacher_points = ("stages",)

    def setup(self, context: MethodContext) -> None:
        pairs = stage_pairs(context.student, context.teacher)
        if len(pairs) < 2:
            raise DistillError(
                "loss=fsp: needs two stages in both nets (an FSP matrix is the flow between two stage outputs); "
                f"the student has {len(stage_points(context.student))}, the teacher {len(stage_points(context.teacher))}"
            )
        self.flow_pairs = list(zip(flows([s for s, _ in pairs]), flows([t for _, t in pairs])))
        for student_stage, teacher_stage in pairs:
            student_channels, teacher_channels = context.student[student_stage][0], context.teacher[teacher_stage][0]
            if student_channels != teacher_channels:
                raise DistillError(
                    f"loss=fsp: the student's {student_stage} has {student_channels} channels, the teacher's "
                    f"{teacher_stage} {teacher_channels}: FSP compares Gram matrices channel by channel, so paired "
                    "stages need the same channel counts"
                )

    def forward(self, student, teacher, batch, epoch):
        total = 0.0
        for student_flow, teacher_flow in self.flow_pairs:
            student_matrix = fsp_matrix(*(student.features[point].float() for point in student_flow))
            teacher_matrix = fsp_matrix(*(teacher.features[point].float() for point in teacher_flow))
            total = total + (student_matrix - teacher_matrix).pow(2).mean()
        return {"fsp": self.weight * total}
