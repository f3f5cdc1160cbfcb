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
    `state_dict()` / `load_state_dict()` save and restore that generator (everything drawn from it)
    and, mid-epoch, the epoch's order and how many batches were handed out, so a resumed run
    continues with exactly the batches an uninterrupted one would have drawn.
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
        self.generator = torch.Generator(device=device).manual_seed(seed) if shuffle or self.augment else None
        self._order: torch.Tensor | None = None  # the current epoch's order (None: unshuffled)
        self._drawn = 0  # batches of the current epoch handed out so far
        self._resume_at: tuple[torch.Tensor | None, int] | None = None  # set by load_state_dict

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean).div_(self.std)

    def state_dict(self) -> dict:
        """The generator's state and, mid-epoch, this epoch's order and the batches handed out."""
        mid_epoch = 0 < self._drawn < len(self)
        return {
            "generator": None if self.generator is None else self.generator.get_state(),
            "order": self._order.cpu() if mid_epoch and self._order is not None else None,
            "drawn": self._drawn if mid_epoch else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: the next iteration continues that epoch, or starts the next one."""
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        order = None if state["order"] is None else state["order"].to(self.labels.device)
        self._resume_at = (order, state["drawn"]) if state["drawn"] else None

    def __iter__(self):
        n = len(self.labels)
        if self._resume_at is not None:
            order, first = self._resume_at
            self._resume_at = None
        elif self.shuffle:
            order, first = torch.randperm(n, generator=self.generator, device=self.labels.device), 0
        else:
            order, first = None, 0
        self._order = order
        for batch in range(first, len(self)):
            self._drawn = batch + 1
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
        self._order, self._drawn = None, 0
