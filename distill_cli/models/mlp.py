"""Multi-layer perceptrons on flattened images (Hinton et al. 2015 use 2x1200 and 2x800 on MNIST)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..data import DatasetInfo
from . import MODELS


@MODELS.register("mlp")
def mlp(info: DatasetInfo, hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> nn.Module:
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear classifier."""
    height, width = info.image_size
    layers: list[nn.Module] = [nn.Flatten()]
    features = info.channels * height * width
    for size in hidden:
        layers += [nn.Linear(features, size), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        features = size
    layers.append(nn.Linear(features, info.num_classes))
    return nn.Sequential(*layers)
