"""Datasets: each module registers a loader returning uint8 image tensors, labels and metadata.

`load_dataset(cfg)` turns that into seeded train/val/test splits with the dataset's metadata
(classes, channels, image size, normalisation, augmentation preset), so models and loaders adapt
to the data without being told.

May import: `core` and other `data` modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.config import DatasetConfig
from ..core.errors import DistillError
from ..core.registry import Registry


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop after zero-padding by `pad` pixels (a +-pad pixel jitter) or, `resized`,
    a random-resized crop of the file, optional horizontal flip, and colour jitter of brightness, contrast and
    saturation by +-`color_jitter`.
    `drawn` > 0 restricts each image to that many views drawn once (`data.augment.draw_views`, FKD's stored
    views; kd's `teacher_views`), among which every epoch picks: a narrower distribution, opt-in."""

    pad: int = 0
    flip: bool = False
    color_jitter: float = 0.0
    drawn: int = 0
    # ImageNet-style random-resized crop of the decoded file (`data.augment.random_resized_crop`), before the rest
    resized: bool = False

    @property
    def active(self) -> bool:
        return bool(self.pad or self.flip or self.color_jitter or self.resized)

    @property
    def view_count(self) -> int:
        """How many different views of an image the preset makes: `drawn` where they were drawn once, else
        (2 pad + 1)^2 crops x 2 with flips; 0 when they cannot be enumerated (colour jitter draws from a
        continuum) or there is no augmentation."""
        if not self.active:
            return 0
        if self.drawn:
            return self.drawn
        if self.color_jitter or self.resized:
            return 0
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)


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
    augment: Augment = Augment()  # the preset `dataset.augment=true` applies


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def image(self, position: int) -> torch.Tensor:
        """One image (C, H, W), as the stream pipeline reads it."""
        return self.images[position]


@dataclass
class DataSplits:
    """The run's splits: in-memory `Split`s, or for a streamed image folder, `FileSplit`s read per image."""

    train: Split  # the training (for kd: transfer) set, without any excluded classes
    val: Split  # empty when dataset.val_split == 0
    test: Split
    info: DatasetInfo


@dataclass
class RawDataset:
    """What a registered loader returns; `test` is None for datasets that ship no test split."""

    train: Split
    test: Split | None
    info: DatasetInfo


def _register_all() -> None:
    from . import digits, imagefolder, synthetic, torchvision_sets  # noqa: F401  (they register)


DATASETS: Registry = Registry("dataset", _register_all)


def _holdout(split: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Split off a seeded random `fraction` of `split`; returns (rest, held_out)."""
    order = torch.randperm(len(split), generator=generator)
    n_held = round(len(split) * fraction)
    return split.subset(order[n_held:]), split.subset(order[:n_held])


def _drop_classes(split: Split, classes: list[int], info: DatasetInfo) -> Split:
    for label in classes:
        if not 0 <= label < info.num_classes:
            raise DistillError(
                f"dataset.exclude_classes: class {label} does not exist ({info.name} has classes 0..{info.num_classes - 1})"
            )
    keep = ~torch.isin(split.labels, torch.tensor(classes, dtype=split.labels.dtype))
    return split.subset(keep.nonzero().squeeze(1))


def _per_channel(key: str, values: list[float], info: DatasetInfo) -> tuple[float, ...]:
    if len(values) != info.channels:
        raise DistillError(f"{key}: {len(values)} values for {info.channels} channels of dataset {info.name}")
    return tuple(float(value) for value in values)


def load_dataset(cfg: DatasetConfig) -> DataSplits:
    """Load `cfg.name`; carve test (if the dataset has none) and validation splits, seeded; drop excluded classes."""
    raw = DATASETS.get(cfg.name)(cfg)
    if cfg.mean is not None:
        raw = replace(raw, info=replace(raw.info, mean=_per_channel("dataset.mean", cfg.mean, raw.info), std=_per_channel("dataset.std", cfg.std, raw.info)))
    classes = raw.info.class_names
    if len(classes) < 2:
        raise DistillError(f"dataset {cfg.name} has {len(classes)} class ({', '.join(classes)}); classification needs at least 2")
    generator = torch.Generator().manual_seed(cfg.split_seed)
    train, test = raw.train, raw.test
    if test is None:
        train, test = _holdout(train, cfg.test_split, generator)
    train, val = _holdout(train, cfg.val_split, generator)
    if cfg.exclude_classes:
        train = _drop_classes(train, list(cfg.exclude_classes), raw.info)
    if len(train) == 0:
        raise DistillError(f"dataset {cfg.name}: no training images left after the validation split and excluded classes")
    return DataSplits(train=train, val=val, test=test, info=raw.info)


def training_augment(cfg: DatasetConfig, info: DatasetInfo, drawn: int = 0) -> Augment | None:
    """The augmentation the training set gets: the dataset's preset plus `color_jitter` (restricted to `drawn`
    views per image drawn once, if > 0), or None when off."""
    if not cfg.augment:
        return None
    if drawn and info.augment.resized:
        raise DistillError(
            "teacher_views: views drawn once are pad crops and flips; dataset.crop=resized draws its crops from a "
            "continuum (use teacher_views=0: the teacher then runs on every step)"
        )
    augment = replace(info.augment, color_jitter=cfg.color_jitter, drawn=drawn)
    return augment if augment.active else None


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale, in bounded memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255).transpose(0, 1).reshape(channels, -1)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() // channels
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
