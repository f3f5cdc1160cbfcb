"""scikit-learn's handwritten digits (UCI ML digits): 1,797 8x8 grey images, 10 classes, no network needed."""

from __future__ import annotations

import torch

from ..core.config import DatasetConfig
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split, channel_stats


@DATASETS.register("digits")
def load_digits(cfg: DatasetConfig) -> RawDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # pixel values are 0..16; scale to the uint8 range every dataset uses
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).mul(255 / 16).round().to(torch.uint8)
    images = pixels.unsqueeze(1)  # (N, 1, 8, 8)
    mean, std = channel_stats(images)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        channels=1,
        image_size=(8, 8),
        mean=mean,
        std=std,
        class_names=tuple(str(d) for d in range(10)),
        augment=Augment(pad=1),  # +-1 pixel jitter, only when asked (dataset.augment=true)
    )
    return RawDataset(train=Split(images, torch.as_tensor(bunch.target, dtype=torch.int64)), test=None, info=info)
