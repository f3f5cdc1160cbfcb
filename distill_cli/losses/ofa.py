"""One-for-All KD (Hao et al. 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS; the authors' code Hao840/OFAKD, `distillers/ofa.py`): every stage of the student gets an
exit branch that projects its feature map into logit space, and each exit, the student's own logits too, learns
the teacher's logits with the adaptive target enhancement

    OFA(z, z_tea) = -sum_c ((p^tea_c + y_c)^eps - y_c) * log p_c      (p = softmax(z / temperature), y one-hot)

averaged over the batch. eps = 1 is cross-entropy with the teacher's probabilities; eps > 1 raises the target
class's weight (1 + p^tea_t)^eps - 1 over the teacher's own p^tea_t, more so where the teacher is unsure of it.
Logit space is where every architecture meets, so the pair may be of any two families (a ViT teacher, a CNN
student): only the teacher's logits are read, so they may come from the cache or the view store.

The terms: `ofa` = weight * the sum over the stage exits, `ofa_logits` = logits_weight * OFA of the student's
logits. Stage k of a student with N stages exits through N - k SepConv blocks (depthwise 3x3 stride 2 + 1x1,
BatchNorm, ReLU, twice; each doubles the channels, the last gives `hidden`), the last stage through a 1x1
convolution to `hidden`; then global average pooling and a linear layer to the classes. Initialised as the
authors' (Kaiming convolutions, BatchNorm 1/0, linear layers truncated normal with std 0.02). Defaults as their
CIFAR-100 command: eps 1, temperature 1, both weights 1, CE weight 1 (ImageNet: `loss.eps=1.5`).

Deliberate differences: `hidden` defaults to the width of the student's last stage; the authors take the larger of
the student's and the teacher's final widths, which would make the teacher's features a read of every step
(`loss.hidden=<n>` sets it; 0, the default, takes the student's). Log-probabilities come from a log-softmax (the authors take the log of a softmax).
Their CIFAR recipe's cross-entropy has label smoothing 0.1; ours is plain.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import stage_points
from . import LOSSES
from .base import Method, MethodContext, non_negative, one_hot_rows, positive, require


def enhanced_targets_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, eps: float, temperature: float) -> Tensor:
    """OFA's loss of `student_logits` against `teacher_logits` with the one-hot `targets`: the batch mean of
    -sum_c ((p^tea_c + y_c)^eps - y_c) * log p_c, both softmaxes at `temperature`, in fp32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    weights = (teacher + targets) ** eps - targets
    return -(weights * log_student).sum(1).mean()


def separable_downsampler(channels_in: int, channels_out: int) -> nn.Sequential:
    """Halves the height and width: a depthwise 3x3 stride-2 and a pointwise convolution, BatchNorm, ReLU, then a
    depthwise 3x3 and a pointwise convolution to `channels_out`, BatchNorm, ReLU (the authors' SepConv)."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_in, 3, stride=2, padding=1, groups=channels_in, bias=False),
        nn.Conv2d(channels_in, channels_in, 1, bias=False),
        nn.BatchNorm2d(channels_in),
        nn.ReLU(),
        nn.Conv2d(channels_in, channels_in, 3, stride=1, padding=1, groups=channels_in, bias=False),
        nn.Conv2d(channels_in, channels_out, 1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
    )


def stage_exit(channels: int, later_stages: int, hidden: int, num_classes: int) -> nn.Sequential:
    """The exit branch of a stage with `channels` channels followed by `later_stages` stages: that many
    downsamplers (the channels doubling, the last to `hidden`), or a 1x1 convolution to `hidden` for the last
    stage; then global average pooling and a linear layer to the classes."""
    if later_stages == 0:
        blocks = [nn.Conv2d(channels, hidden, 1)]
    else:
        widths = [channels * 2**k for k in range(later_stages)] + [hidden]
        blocks = [separable_downsampler(widths[k], widths[k + 1]) for k in range(later_stages)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))


def _initialise(module: nn.Module) -> None:
    """The authors' initialisation of the exits."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


@LOSSES.register("ofa")
class OneForAll(Method):
    """weight * OFA of an exit branch on every student stage + logits_weight * OFA of the student's logits."""

    reads_logits = True

    def __init__(self, weight: float = 1.0, logits_weight: float = 1.0, eps: float = 1.0, temperature: float = 1.0, hidden: int = 0):
        super().__init__()
        non_negative("loss.weight", weight)
        non_negative("loss.logits_weight", logits_weight)
        positive("loss.eps", eps)
        positive("loss.temperature", temperature)
        require(hidden >= 0, "loss.hidden", f"must be 0 (the width of the student's last stage) or more, got {hidden}")
        self.weight, self.logits_weight, self.eps, self.temperature, self.hidden = weight, logits_weight, eps, temperature, hidden
        self.student_points = ("stages",)

    def setup(self, context: MethodContext) -> None:
        self.stages = stage_points(context.student)
        require(bool(self.stages), "loss=ofa", "the student has no stages to put exits on")
        shapes = [context.student[stage] for stage in self.stages]
        require(all(len(shape) == 3 for shape in shapes), "loss=ofa", "its exits take (C, H, W) stage maps; the student's stages are not")
        hidden = self.hidden or shapes[-1][0]
        last = len(self.stages) - 1
        self.exits = nn.ModuleList(stage_exit(shape[0], last - index, hidden, context.num_classes) for index, shape in enumerate(shapes))
        _initialise(self.exits)

    def forward(self, student, teacher, batch, epoch):
        targets = one_hot_rows(batch.labels, student.logits.shape[1])
        terms = [
            enhanced_targets_loss(exit_(student.features[stage].float()), teacher.logits, targets, self.eps, self.temperature)
            for stage, exit_ in zip(self.stages, self.exits)
        ]
        logits = enhanced_targets_loss(student.logits, teacher.logits, targets, self.eps, self.temperature)
        return {"ofa": self.weight * sum(terms), "ofa_logits": self.logits_weight * logits}

