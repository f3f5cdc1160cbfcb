"""A small VGG-style CNN: `blocks` stages of two 3x3 conv-BN-ReLU layers, widths doubling per stage."""

from __future__ import annotations

from torch import nn

from ..data import DatasetInfo
from . import MODELS


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@MODELS.register("cnn")
def cnn(info: DatasetInfo, width: int = 32, blocks: int = 2) -> nn.Module:
    """Stages of conv-conv (max-pooled between stages), global average pool, linear classifier."""
    layers: list[nn.Module] = []
    channels = info.channels
    for stage in range(blocks):
        out = width * 2**stage
        if stage > 0:
            layers.append(nn.MaxPool2d(2))
        layers += _conv_bn_relu(channels, out) + _conv_bn_relu(out, out)
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, info.num_classes)]
    return nn.Sequential(*layers)
