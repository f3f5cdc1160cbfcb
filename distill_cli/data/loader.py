"""Batches drawn from tensors kept on the compute device: no workers, no per-sample Python."""

from __future__ import annotations

import torch

from . import DatasetInfo, Split


class DeviceLoader:
    """Iterates (images, labels) batches of a split that lives on `device`.

    Images stay uint8 until a batch is drawn, then are normalised with the dataset's statistics.
    Training order comes from an on-device permutation drawn from this loader's own seeded
    generator, so the data order is reproducible and independent of model initialisation.
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
    ):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        shape = (1, info.channels, 1, 1)
        self.mean = torch.tensor(info.mean, device=device).view(shape)
        self.std = torch.tensor(info.std, device=device).view(shape)
        self.generator = torch.Generator(device=device).manual_seed(seed) if shuffle else None

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
            yield self.normalise(images), labels
