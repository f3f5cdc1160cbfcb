"""MobileNetV2 (Sandler et al. 2018) in the CIFAR form used by CRD / RepDistiller / mdistiller.

The zoo's `mobilenetv2` is their "mobile_half": width multiplier 0.5, expansion 6, a stride-2 stem
(so 32x32 inputs end at 2x2), and a 1x1 conv to 1280 channels before pooling.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, conv_bn, stage, zoo_net


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (with `stride`) -> 1x1 linear projection; identity shortcut when the
    shape is kept. As in the reference, the expanding 1x1 conv is there even for expansion 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def _settings(expansion: int) -> list[tuple[int, int, int, int]]:
    """(expansion, channels, blocks, stride) per block group, from the MobileNetV2 paper (CIFAR strides)."""
    e = expansion
    return [(1, 16, 1, 1), (e, 24, 2, 1), (e, 32, 3, 2), (e, 64, 4, 2), (e, 96, 3, 1), (e, 160, 3, 2), (e, 320, 1, 1)]


@MODELS.register("mobilenetv2")
def mobilenetv2(info: DatasetInfo, width_mult: float = 0.5, expansion: int = 6) -> nn.Module:
    """MobileNetV2 with `width_mult` and `expansion` (the t of the paper's table 2).

    The seven block groups are merged into four stages, one per resolution (a new stage starts at
    each stride-2 group): the stage outputs are the reference's feature points f1 to f4.
    """
    channels = int(32 * width_mult)
    stem = conv_bn(info.channels, channels, 3, stride=2)
    stages: list[list[nn.Module]] = []
    for t, c, n, s in _settings(expansion):
        if s == 2 or not stages:
            stages.append([])
        stages[-1].append(stage(InvertedResidual, channels, int(c * width_mult), n, s, expansion=t))
        channels = int(c * width_mult)
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    head = classifier_head(last, info.num_classes, pre=conv_bn(channels, last, 1))
    return zoo_net(stem, [nn.Sequential(*groups) for groups in stages], head, linear_std=0.01)
