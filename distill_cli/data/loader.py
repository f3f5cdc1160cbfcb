"""Batches drawn from tensors kept on the compute device: no workers, no per-sample Python."""

from __future__ import annotations

import torch

from . import Augment, DatasetInfo, Split
from .augment import apply


class DeviceLoader:
    """Iterates (images, labels) batches of a split that lives on `device`.

    Images stay uint8 until a batch is drawn, are augmented as a batch (when `augment` is given)
    and then normalised with the dataset's statistics. The order (an on-device permutation) and the
    augmentation draw from this loader's own seeded generator, so the data a run sees is
    reproducible and independent of model initialisation.
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
    ):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        shape = (1, info.channels, 1, 1)
        self.mean = torch.tensor(info.mean, device=device).view(shape)
        self.std = torch.tensor(info.std, device=device).view(shape)
        self.augment = augment if augment is not None and (augment.pad or augment.flip) else None
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean).div_(self.std)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=self.labels.device)
        else:
            order = None
        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                index = order[start:stop]
                images, labels = self.images[index], self.labels[index]
            if self.augment is not None:
                images = apply(images, self.augment, self.generator)
            yield self.normalise(images), labels
