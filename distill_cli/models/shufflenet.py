"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) in the CIFAR form used by CRD /
RepDistiller / mdistiller: a 1x1 conv-BN-ReLU stem to 24 channels at full resolution, three stages
that each start by halving the resolution (32x32 inputs end at 4x4), global average pooling and a
linear classifier. Both keep PyTorch's default initialisation, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, conv_bn, zoo_net

STEM_CHANNELS = 24


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` groups: (N, g*c, H, W) -> (N, c*g, H, W)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 conv -> shuffle -> 3x3 depthwise -> grouped 1x1 conv, added to the input; a stride-2
    unit instead concatenates a 3x3 average-pooled input (so its branch makes out - in channels).

    `first_groups` is the group count of the first 1x1 conv (1 in the network's first unit, whose
    input is the narrow stem). The depthwise conv is followed by ReLU, as in the reference code.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = branch // 4
        self.body = nn.Sequential(
            conv_bn(in_channels, mid, 1, groups=first_groups),
            ChannelShuffle(first_groups),
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, branch, 1, groups=groups, relu=False),
        )
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        out = out + x if self.pool is None else torch.cat([out, self.pool(x)], 1)
        return self.relu(out)


class ShuffleUnitV2(nn.Module):
    """Split the channels in half, transform one half (1x1 -> 3x3 depthwise -> 1x1), concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([kept, self.branch(transformed)], 1))


class DownUnitV2(nn.Module):
    """Stride-2 unit: both branches see the whole input (left: 3x3 depthwise -> 1x1; right: 1x1 -> 3x3
    depthwise -> 1x1), each makes half the output channels; concatenate, shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
            conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            conv_bn(half, half, 3, 2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


@MODELS.register("shufflenetv1")
def shufflenetv1(
    info: DatasetInfo, out_channels: Sequence[int] = (240, 480, 960), blocks: Sequence[int] = (4, 8, 4), groups: int = 3
) -> nn.Module:
    """ShuffleNet V1 with `groups` groups; `out_channels` and `blocks` per stage (default: g=3, 1x)."""
    stages, channels = [], STEM_CHANNELS
    for index, (out, count) in enumerate(zip(out_channels, blocks)):
        first = ShuffleUnitV1(channels, out, 2, groups, first_groups=1 if index == 0 else groups)
        rest = (ShuffleUnitV1(out, out, 1, groups, first_groups=groups) for _ in range(count - 1))
        stages.append(nn.Sequential(first, *rest))
        channels = out
    stem = conv_bn(info.channels, STEM_CHANNELS, 1)
    return zoo_net(stem, stages, classifier_head(channels, info.num_classes), kaiming=False)


@MODELS.register("shufflenetv2")
def shufflenetv2(
    info: DatasetInfo, out_channels: Sequence[int] = (116, 232, 464, 1024), blocks: Sequence[int] = (3, 7, 3)
) -> nn.Module:
    """ShuffleNet V2: per stage a stride-2 unit plus `blocks` units, `out_channels` per stage and for the
    last 1x1 conv (default: the 1x model, as the reference's ShuffleV2)."""
    *widths, last = out_channels
    stages, channels = [], STEM_CHANNELS
    for out, count in zip(widths, blocks):
        stages.append(nn.Sequential(DownUnitV2(channels, out), *(ShuffleUnitV2(out) for _ in range(count))))
        channels = out
    stem = conv_bn(info.channels, STEM_CHANNELS, 1)
    head = classifier_head(last, info.num_classes, pre=conv_bn(channels, last, 1))
    return zoo_net(stem, stages, head, kaiming=False)
