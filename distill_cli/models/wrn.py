"""Wide ResNets (Zagoruyko & Komodakis 2016) in the CIFAR form used by CRD / RepDistiller / mdistiller.

WRN-depth-k: a 3x3 conv to 16 channels, three stages of `(depth - 4) / 6` pre-activation blocks with
16k, 32k and 64k channels (the second and third halve the resolution), a final BN-ReLU, global
average pooling and a linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.errors import DistillError
from ..data import DatasetInfo
from . import MODELS
from .layers import classifier_head, resolution_stages, zoo_net


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class PreActBlock(nn.Module):
    """BN-ReLU -> 3x3 conv -> BN-ReLU -> [dropout] -> 3x3 conv, plus the input (or a 1x1 projection
    of the activated input when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.preact = _bn_relu(in_channels)
        body: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
            *_bn_relu(out_channels),
        ]
        if dropout > 0:
            body.append(nn.Dropout(dropout))
        body.append(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*body)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if reshape else None

    def forward(self, x: Tensor) -> Tensor:
        activated = self.preact(x)
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return self.body(activated) + shortcut


@MODELS.register("wrn")
def wrn(info: DatasetInfo, depth: int = 16, widen_factor: int = 1, dropout: float = 0.0) -> nn.Module:
    """WRN-`depth`-`widen_factor` (depth = 6n + 4); `dropout` between each block's two convolutions."""
    if depth < 10 or (depth - 4) % 6:
        raise DistillError(f"wrn: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    stages = resolution_stages(PreActBlock, 16, widths, (depth - 4) // 6, dropout=dropout)
    stem = nn.Conv2d(info.channels, 16, 3, padding=1, bias=False)
    head = classifier_head(widths[-1], info.num_classes, pre=_bn_relu(widths[-1]))
    return zoo_net(stem, stages, head)
