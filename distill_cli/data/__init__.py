"""Datasets: each module registers a loader returning uint8 image tensors and labels.

`load_dataset(cfg)` turns that into seeded train/val/test splits with the dataset's metadata
(classes, channels, image size, normalisation), so models adapt to the data without being told.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DatasetConfig
from ..errors import DistillError
from ..registry import Registry


@dataclass
class DatasetInfo:
    """What a model and the loaders need to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class DataSplits:
    train: Split
    val: Split  # empty when dataset.val_split == 0
    test: Split
    info: DatasetInfo


@dataclass
class RawDataset:
    """What a registered loader returns; `test` is None for datasets that ship no test split."""

    train: Split
    test: Split | None
    info: DatasetInfo


DATASETS: Registry = Registry("dataset")


def _holdout(split: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Split off a seeded random `fraction` of `split`; returns (rest, held_out)."""
    order = torch.randperm(len(split), generator=generator)
    n_held = round(len(split) * fraction)
    return split.subset(order[n_held:]), split.subset(order[:n_held])


def load_dataset(cfg: DatasetConfig) -> DataSplits:
    """Load `cfg.name` and carve test (if the dataset has none) and validation splits, seeded."""
    from . import digits  # noqa: F401  (registers)

    raw = DATASETS.get(cfg.name)(cfg)
    generator = torch.Generator().manual_seed(cfg.split_seed)
    train, test = raw.train, raw.test
    if test is None:
        train, test = _holdout(train, cfg.test_split, generator)
    train, val = _holdout(train, cfg.val_split, generator)
    if len(train) == 0:
        raise DistillError(f"dataset.val_split={cfg.val_split} leaves no training data")
    return DataSplits(train=train, val=val, test=test, info=raw.info)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale."""
    x = images.float().div_(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())
