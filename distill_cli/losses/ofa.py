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
logits. A CNN student's stages are maps: stage k of N exits through N - k SepConv blocks (depthwise 3x3 stride 2 +
1x1, BatchNorm, ReLU, twice; each doubles the channels, the last gives `hidden`), the last stage through a 1x1
convolution to `hidden`; then global average pooling and a linear layer to the classes. A ViT or MLP-Mixer
student's stages are its blocks' token sequences (N tokens of width D: class tokens, then a square grid of
patches); four of them get exits, the last block of each quarter (all of them where there are four or fewer). Such
an exit maps the tokens to `hidden` where D differs, merges the patches 2x2 (Swin's patch merging) down to a grid
of at most 7 (the size of the authors' ImageNet exits; none for a 32x32 image in 4x4 patches), runs 3, 2, 1, 1
transformer blocks (pre-norm, 4 heads, MLP x4, GELU) for the four exits, then reads the first class token (the
tokens' mean where there is none) into a linear layer to the classes. Initialised as the authors' (Kaiming
convolutions, BatchNorm and LayerNorm 1/0, linear layers and attention projections truncated normal with std 0.02).
Defaults as their CIFAR-100 command: eps 1, temperature 1, both weights 1, CE weight 1 (ImageNet: `loss.eps=1.5`).

Deliberate differences: `hidden` defaults to the width of the student's last stage; the authors take the larger of
the student's and the teacher's final widths, which would make the teacher's features a read of every step
(`loss.hidden=<n>` sets it; 0, the default, takes the student's). Log-probabilities come from a log-softmax (the authors take the log of a softmax).
Their CIFAR recipe's cross-entropy has label smoothing 0.1; ours is plain. A ViT's exits sit on the last block of
each quarter (blocks 3, 6, 9, 12 of 12; the authors take blocks 2, 4, 10, 12), and their transformer blocks are
torch's `TransformerEncoderLayer`, whose attention has biases on its query, key and value (timm's `Block` has none
there by default); the class token is told from the patches by the token count (N minus the largest square in it).
"""

from __future__ import annotations

import math

import torch
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


class PatchMerging(nn.Module):
    """Halves a square grid of patch tokens (B, grid * grid, width): each 2x2 neighbourhood's tokens concatenated,
    LayerNorm, a linear map back to `width`, GELU where `activation` (the Swin Transformer's patch merging, as in the
    authors' exits)."""

    def __init__(self, grid: int, width: int, activation: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * width)
        self.reduction = nn.Linear(4 * width, width, bias=False)
        self.activation = nn.GELU() if activation else nn.Identity()

    def forward(self, patches: Tensor) -> Tensor:
        batch, _, width = patches.shape
        grid = patches.reshape(batch, self.grid, self.grid, width)
        merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1)
        return self.activation(self.reduction(self.norm(merged.reshape(batch, -1, 4 * width))))


class TokenExit(nn.Module):
    """The exit branch of a token stage of `tokens` tokens of `width` (class tokens, then a square grid of patches):
    a linear map to `hidden` where the widths differ, patch merging down to a grid of at most 7, `blocks` transformer
    blocks, then the first class token (or the tokens' mean) into a linear layer to the classes."""

    FINAL_GRID = 7  # the authors' exits merge patches until a grid of 7 x 7 is left

    def __init__(self, tokens: int, width: int, hidden: int, blocks: int, num_classes: int):
        super().__init__()
        grid = math.isqrt(tokens)
        self.class_tokens = tokens - grid * grid
        merges = max(int(math.log2(grid / self.FINAL_GRID)), 0)
        grids = [grid // 2**k for k in range(merges)]
        require(all(size % 2 == 0 for size in grids), "loss=ofa", f"a token stage's grid of {grid} x {grid} patches cannot be halved {merges} times")
        self.project = nn.Linear(width, hidden) if width != hidden else nn.Identity()
        # as the authors: GELU after every merge but the last, and after the first
        self.merges = nn.Sequential(*(PatchMerging(size, hidden, k == 0 or k < merges - 1) for k, size in enumerate(grids)))
        self.blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, dropout=0.0, activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True)
                for _ in range(blocks)
            )
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.project(tokens)
        tokens = torch.cat([tokens[:, : self.class_tokens], self.merges(tokens[:, self.class_tokens :])], dim=1)
        tokens = self.blocks(tokens)
        return self.head(tokens[:, 0] if self.class_tokens else tokens.mean(1))


def quarter_ends(count: int) -> list[int]:
    """The token stages (of `count`) that get exits: every one of up to four, else the last of each quarter."""
    return list(range(count)) if count <= 4 else [(quarter + 1) * count // 4 - 1 for quarter in range(4)]


def _initialise(module: nn.Module) -> None:
    """The authors' initialisation of the exits."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.MultiheadAttention):
            nn.init.trunc_normal_(layer.in_proj_weight, std=0.02)
            nn.init.zeros_(layer.in_proj_bias)


@LOSSES.register("ofa")
class OneForAll(Method):
    """weight * OFA of an exit branch on every student stage + logits_weight * OFA of the student's logits."""

    reads_logits = True
    token_stages = True

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
        if all(len(shape) == 3 for shape in shapes):  # maps (C, H, W)
            hidden = self.hidden or shapes[-1][0]
            last = len(self.stages) - 1
            exits = [stage_exit(shape[0], last - index, hidden, context.num_classes) for index, shape in enumerate(shapes)]
        else:  # token sequences (N, D)
            require(all(len(shape) == 2 for shape in shapes), "loss=ofa", f"the student's stages are neither all (C, H, W) maps nor all (N, D) token sequences: {[tuple(shape) for shape in shapes]}")
            picked = quarter_ends(len(shapes))
            self.stages = [self.stages[index] for index in picked]
            hidden = self.hidden or shapes[-1][1]
            require(hidden % 4 == 0, "loss.hidden", f"the token exits' attention has 4 heads: the width must be a multiple of 4, got {hidden}")
            exits = [TokenExit(*shapes[index], hidden, max(len(picked) - 1 - rank, 1), context.num_classes) for rank, index in enumerate(picked)]
        self.exits = nn.ModuleList(exits)
        _initialise(self.exits)

    def forward(self, student, teacher, batch, epoch):
        targets = one_hot_rows(batch.labels, student.logits.shape[1])
        terms = [
            enhanced_targets_loss(exit_(student.features[stage].float()), teacher.logits, targets, self.eps, self.temperature)
            for stage, exit_ in zip(self.stages, self.exits)
        ]
        logits = enhanced_targets_loss(student.logits, teacher.logits, targets, self.eps, self.temperature)
        return {"ofa": self.weight * sum(terms), "ofa_logits": self.logits_weight * logits}

