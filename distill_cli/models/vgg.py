"""VGG with BatchNorm in the CIFAR form used by CRD / RepDistiller / mdistiller (their `vgg*_bn`).

Five groups of 3x3 conv-BN-ReLU layers (64, 128, 256, 512, 512 channels) with 2x2 max pooling
between the first four, no fully connected layers but one linear classifier after global average
pooling. The name counts the original VGG's 3 FC layers: vgg13 has 10 convolutions.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import DistillError
from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, conv_bn, zoo_net

WIDTHS = (64, 128, 256, 512, 512)
# depth -> convolutions per group (VGG's configurations S (RepDistiller's vgg8), A, B, D, E)
CONVS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _convs(in_channels: int, out_channels: int, count: int) -> list[nn.Module]:
    """`count` conv-BN-ReLU layers (the reference's convolutions keep their bias next to BN)."""
    return [conv_bn(in_channels if i == 0 else out_channels, out_channels, bias=True) for i in range(count)]


@MODELS.register("vgg")
def vgg(info: DatasetInfo, depth: int = 13) -> nn.Module:
    """VGG-`depth` (8, 11, 13, 16 or 19) with BatchNorm; `stem` is the first group, `stages` the other four.

    The last group keeps the resolution of the one before unless images are 64 px or larger, as in
    the reference (its `h == 64` check for Tiny-ImageNet), so 32x32 inputs end at 4x4.
    """
    if depth not in CONVS:
        raise DistillError(f"vgg: depth must be one of {', '.join(map(str, CONVS))}, got {depth}")
    counts = CONVS[depth]
    stem = nn.Sequential(*_convs(info.channels, WIDTHS[0], counts[0]))
    stages = []
    for index in range(1, len(WIDTHS)):
        pool = [nn.MaxPool2d(2)] if index < 4 or min(info.image_size) >= 64 else []
        stages.append(nn.Sequential(*pool, *_convs(WIDTHS[index - 1], WIDTHS[index], counts[index])))
    return zoo_net(stem, stages, classifier_head(WIDTHS[-1], info.num_classes), linear_std=0.01)
