"""Generated images for benchmarks and smoke tests: per-class random templates plus noise.

Learnable (each class has its own template) but not a substitute for real data in accuracy claims.
Shape, channels, classes and sizes come from the dataset config.
"""

from __future__ import annotations

import torch

from ..core.config import DatasetConfig
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split


def _generate(templates: torch.Tensor, count: int, generator: torch.Generator) -> Split:
    labels = torch.randint(0, len(templates), (count,), generator=generator)
    noise = torch.randn((count, *templates.shape[1:]), generator=generator) * 40
    images = (templates[labels] + noise).clamp_(0, 255).round_().to(torch.uint8)
    return Split(images, labels)


@DATASETS.register("synthetic")
def load_synthetic(cfg: DatasetConfig) -> RawDataset:
    size = cfg.image_size or 32
    generator = torch.Generator().manual_seed(cfg.split_seed)
    templates = torch.rand((cfg.num_classes, cfg.channels, size, size), generator=generator) * 255
    train = _generate(templates, cfg.train_size, generator)
    test = _generate(templates, cfg.test_size, generator)
    info = DatasetInfo(
        name="synthetic",
        num_classes=cfg.num_classes,
        channels=cfg.channels,
        image_size=(size, size),
        mean=(0.5,) * cfg.channels,
        std=(0.25,) * cfg.channels,
        class_names=tuple(str(i) for i in range(cfg.num_classes)),
        augment=Augment(pad=max(1, size // 8), flip=True),
    )
    return RawDataset(train=train, test=test, info=info)
