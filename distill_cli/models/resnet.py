"""CIFAR ResNets (He et al. 2016, section 4.2) as used by CRD / RepDistiller / mdistiller.

A 3x3 stem, three stages of `(depth - 2) / 6` basic blocks (16, 32 and 64 channels times `width`;
the second and third stage halve the resolution), global average pooling and a linear classifier.
resnet8 ... resnet110 are `width=1, stem=16`; the "x4" models (resnet8x4, resnet32x4) are
`width=4, stem=32`, the reference's [32, 64, 128, 256] channel list.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.errors import DistillError
from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, conv_bn, resolution_stages, zoo_net


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride),
            conv_bn(out_channels, out_channels, 3, relu=False),
        )
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride, relu=False) if reshape else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


@MODELS.register("resnet_cifar")
def resnet_cifar(info: DatasetInfo, depth: int = 20, width: int = 1, stem: int = 16) -> nn.Module:
    """CIFAR ResNet of `depth` = 6n + 2 layers; stage widths 16, 32, 64 times `width`; `stem` channels."""
    if depth < 8 or (depth - 2) % 6:
        raise DistillError(f"resnet_cifar: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    stages = resolution_stages(BasicBlock, stem, (16 * width, 32 * width, 64 * width), (depth - 2) // 6)
    return zoo_net(conv_bn(info.channels, stem, 3), stages, classifier_head(64 * width, info.num_classes))
