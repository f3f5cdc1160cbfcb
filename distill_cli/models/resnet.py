"""CIFAR ResNets (He et al. 2016, section 4.2) as used by CRD / RepDistiller / mdistiller.

A 3x3 stem, three stages of `(depth - 2) / 6` basic blocks (16, 32 and 64 channels times `width`;
the second and third stage halve the resolution), global average pooling and a linear classifier.
resnet8 ... resnet110 are `width=1, stem=16`; the "x4" models (resnet8x4, resnet32x4) are
`width=4, stem=32`, the reference's [32, 64, 128, 256] channel list.

`resnet_bottleneck` is the ImageNet ResNet's bottleneck design on a CIFAR stem (RepDistiller's
`models/resnetv2.py`, the tables' "ResNet50" teacher): a 3x3 stem of 64 channels without max-pooling, four
stages of bottleneck blocks, the last three halving the resolution.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.errors import DistillError
from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, conv_bn, resolution_stages, zoo_net


class ResidualBlock(nn.Module):
    """`body` plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, body: nn.Module, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = body
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride, relu=False) if reshape else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def basic_block(in_channels: int, out_channels: int, stride: int) -> ResidualBlock:
    """Two 3x3 conv-BN layers (the first with the stride) and the shortcut."""
    body = nn.Sequential(conv_bn(in_channels, out_channels, 3, stride), conv_bn(out_channels, out_channels, 3, relu=False))
    return ResidualBlock(body, in_channels, out_channels, stride)


def bottleneck_block(in_channels: int, out_channels: int, stride: int) -> ResidualBlock:
    """1x1 conv-BN-ReLU down to a quarter of `out_channels`, 3x3 conv-BN-ReLU (with the stride), 1x1 conv-BN back
    up, and the shortcut."""
    width = out_channels // 4
    body = nn.Sequential(conv_bn(in_channels, width, 1), conv_bn(width, width, 3, stride), conv_bn(width, out_channels, 1, relu=False))
    return ResidualBlock(body, in_channels, out_channels, stride)


@MODELS.register("resnet_cifar")
def resnet_cifar(info: DatasetInfo, depth: int = 20, width: int = 1, stem: int = 16) -> nn.Module:
    """CIFAR ResNet of `depth` = 6n + 2 layers; stage widths 16, 32, 64 times `width`; `stem` channels."""
    if depth < 8 or (depth - 2) % 6:
        raise DistillError(f"resnet_cifar: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    stages = resolution_stages(basic_block, stem, (16 * width, 32 * width, 64 * width), (depth - 2) // 6)
    return zoo_net(conv_bn(info.channels, stem, 3), stages, classifier_head(64 * width, info.num_classes))


@MODELS.register("resnet_bottleneck")
def resnet_bottleneck(info: DatasetInfo, blocks: tuple[int, ...] = (3, 4, 6, 3), stem: int = 64) -> nn.Module:
    """Bottleneck ResNet on a CIFAR stem: `blocks` per stage (3, 4, 6, 3: ResNet50), stage outputs 4x (64, 128,
    256, 512) channels, each stage after the first halving the resolution."""
    if len(blocks) != 4 or min(blocks) < 1:
        raise DistillError(f"resnet_bottleneck: blocks must be four counts >= 1 (ResNet50: [3, 4, 6, 3]), got {list(blocks)}")
    stages = resolution_stages(bottleneck_block, stem, (256, 512, 1024, 2048), list(blocks))
    return zoo_net(conv_bn(info.channels, stem, 3), stages, classifier_head(2048, info.num_classes))
