"""The two data pipelines. Both hand out `Batch(images, labels, index, view)` on the compute device.

- `DeviceLoader`: the split lives on the device as uint8; an on-device permutation orders it and the
  augmentation runs batched on the device. No workers and no per-sample Python: for data that fits.
- `StreamLoader`: a torch DataLoader whose workers read (for image folders: decode) and augment each
  sample on its own, with pinned memory and non-blocking copies: for data that does not fit.

Both normalise on the device, into the compute dtype and memory format, and share the resumable
epoch bookkeeping (`state_dict` / `load_state_dict`). `build_loader` picks one (`choose_pipeline`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..core.config import DatasetConfig
from ..core.errors import DistillError
from . import Augment, DatasetInfo
from .augment import apply_drawn, apply_drawn_views, apply_with_views, augment_one_with_view, draw_views, views_of


class Batch(NamedTuple):
    images: torch.Tensor  # normalised, in the compute dtype and memory format
    labels: torch.Tensor
    index: torch.Tensor  # the images' positions in their split (for per-sample tables)
    # the augmented view each image shows (`augment.view_id`), where the preset's views can be enumerated;
    # with `index`, the key of per-view tables (the teacher-view store). None: unaugmented, or not enumerable
    view: torch.Tensor | None = None


class Loader:
    """Batching arithmetic, normalisation and the resumable epoch order shared by both pipelines.

    The order (a permutation per epoch) and the augmentation draw from the loader's own seeded
    generator, so the data a run sees is reproducible and independent of model initialisation.
    `state_dict()` saves that generator and, mid-epoch, the epoch's order and how many batches were
    handed out, so a resumed run continues with exactly the batches an uninterrupted one would draw.
    """

    def __init__(
        self,
        split,
        info: DatasetInfo,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        generator_device: torch.device | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        self.num_images = len(split)
        self.device = device
        self.batch_size = batch_size
        # (rank, world size) of data-parallel training: each batch of batch_size x world images is drawn
        # as by one process (same order and augmentation draws: every rank's generator is seeded alike)
        # and this rank keeps its batch_size of them. Only with drop_last, so every rank has a full share
        self.rank, self.world = shard
        if self.world > 1 and not drop_last:
            raise ValueError("a sharded loader drops the last incomplete batch")
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = (1, info.channels, 1, 1)
        self.mean = torch.tensor(info.mean, device=device).view(shape)
        self.std = torch.tensor(info.std, device=device).view(shape)
        self.augment = augment if augment is not None and augment.active else None
        # with `augment.drawn`: the parameters of the views each image may show (`augment.draw_views`)
        self.drawn = draw_views(self.augment, self.num_images) if self.augment is not None and self.augment.drawn else None
        self.generator = None
        if shuffle or self.augment:
            self.generator = torch.Generator(device=generator_device or device).manual_seed(seed)
        self._order: torch.Tensor | None = None  # the current epoch's order (None: unshuffled)
        self._drawn = 0  # batches of the current epoch handed out so far
        self._resume_at: dict | None = None  # set by load_state_dict

    @property
    def global_batch_size(self) -> int:
        """Images per step over all ranks."""
        return self.batch_size * self.world

    def __len__(self) -> int:
        n, size = self.num_images, self.global_batch_size
        return n // size if self.drop_last else -(-n // size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on the device -> normalised, in the compute dtype and memory format."""
        normalised = (images.float().div_(255) - self.mean).div_(self.std)
        return normalised.to(dtype=self.dtype, memory_format=self.memory_format)

    def view_of(self, images: torch.Tensor, positions: torch.Tensor, view: int) -> torch.Tensor:
        """The uint8 images (at `positions` of the split) as seen in view `view` (`Batch.view`), so that the view a
        batch drew can be made again (the teacher-view store is built this way)."""
        if self.drawn is not None:
            return apply_drawn(images, self.augment, self.drawn[positions.to(self.drawn.device), view].to(images.device))
        return views_of(images, self.augment, torch.full((len(images),), view, device=images.device))

    def _epoch_state(self) -> dict:
        """What, besides the generator and the order, a subclass needs to replay this epoch."""
        return {}

    def state_dict(self) -> dict:
        """The generator's state and, mid-epoch, this epoch's order and the batches handed out."""
        mid_epoch = 0 < self._drawn < len(self)
        return {
            "generator": None if self.generator is None else self.generator.get_state(),
            "order": self._order.cpu() if mid_epoch and self._order is not None else None,
            "drawn": self._drawn if mid_epoch else 0,
            **(self._epoch_state() if mid_epoch else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: the next iteration continues that epoch, or starts the next one."""
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self._resume_at = state if state["drawn"] else None

    def _begin_epoch(self) -> tuple[dict | None, int]:
        """Set this epoch's order; returns the saved epoch state when resuming and the first batch."""
        resumed, self._resume_at = self._resume_at, None
        if resumed is not None:
            order = resumed["order"]
            self._order = None if order is None else order.to(self.generator.device)
            return resumed, resumed["drawn"]
        self._order = None
        if self.shuffle:
            self._order = torch.randperm(self.num_images, generator=self.generator, device=self.generator.device)
        return None, 0

    def _batch_positions(self, first: int):
        """(batch number, positions in the split) for this rank's part of the batches of this epoch from
        `first` on."""
        for batch in range(first, len(self)):
            start = batch * self.global_batch_size + self.rank * self.batch_size
            stop = min(start + self.batch_size, self.num_images)
            yield batch, (slice(start, stop) if self._order is None else self._order[start:stop])

    def _part(self):
        """Which rows of the whole step's batch this rank's batch is (for the augmentation draws)."""
        if self.world == 1:
            return None
        return self.global_batch_size, slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)


class DeviceLoader(Loader):
    """Batches of a split kept on the compute device as uint8, augmented there as a batch."""

    def __init__(self, split, info: DatasetInfo, batch_size: int, device: torch.device, **options):
        super().__init__(split, info, batch_size, device, **options)
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.positions = torch.arange(self.num_images, device=device)
        if self.drawn is not None:
            self.drawn = self.drawn.to(device)

    def __iter__(self):
        _, first = self._begin_epoch()
        for batch, where in self._batch_positions(first):
            self._drawn = batch + 1
            images, views = self.images[where], None
            if self.drawn is not None:
                images, views = apply_drawn_views(images, self.positions[where], self.augment, self.drawn, self.generator, self._part())
            elif self.augment is not None:
                images, views = apply_with_views(images, self.augment, self.generator, self._part())
            yield Batch(self.normalise(images), self.labels[where], self.positions[where], views)
        self._order, self._drawn = None, 0


class _Samples(torch.utils.data.Dataset):
    """Per-sample access for DataLoader workers: key (position, seed) -> (uint8 image, label, position, view).

    The augmentation of each sample draws from a generator seeded with its own seed, so the views do
    not depend on which worker loads the sample, and a resumed epoch replays them exactly.
    """

    def __init__(self, split, augment: Augment | None, drawn: torch.Tensor | None):
        self.split = split
        self.augment = augment
        self.drawn = drawn  # the views drawn once (`augment.draw_views`), or None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        position, seed = key
        if self.augment is not None and self.augment.resized:  # cropped from the file as it is, to the split's size
            image, view = augment_one_with_view(self.split.source(position), self.augment, torch.Generator().manual_seed(seed), self.split.size)
            return image, self.split.labels[position], position, view
        image, view = self.split.image(position), -1
        if self.drawn is not None:
            view = int(torch.randint(0, self.augment.drawn, (), generator=torch.Generator().manual_seed(seed)))
            image = apply_drawn(image[None], self.augment, self.drawn[position, view][None])[0]
        elif self.augment is not None:
            image, view = augment_one_with_view(image, self.augment, torch.Generator().manual_seed(seed))
        return image, self.split.labels[position], position, view


class _EpochBatches:
    """A batch sampler whose batches the loader sets at the start of every epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class StreamLoader(Loader):
    """Batches read sample by sample by DataLoader workers, copied to the device without blocking."""

    def __init__(self, split, info: DatasetInfo, batch_size: int, device: torch.device, *, workers: int | None = None, **options):
        super().__init__(split, info, batch_size, device, generator_device=torch.device("cpu"), **options)
        self._epoch_seed = 0
        self._sampler = _EpochBatches()
        workers = _default_workers() if workers is None else workers
        self._loader = torch.utils.data.DataLoader(
            _Samples(split, self.augment, self.drawn),
            batch_sampler=self._sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _epoch_state(self) -> dict:
        return {"epoch_seed": self._epoch_seed}

    def __iter__(self):
        resumed, first = self._begin_epoch()
        if resumed is not None:
            self._epoch_seed = resumed["epoch_seed"]
        elif self.augment is not None:
            self._epoch_seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        every_position = torch.arange(self.num_images)
        self._sampler.batches = [
            [(position, self._epoch_seed + position) for position in every_position[where].tolist()]
            for _, where in self._batch_positions(first)
        ]
        try:
            for batch, (images, labels, positions, views) in enumerate(self._loader, start=first):
                self._drawn = batch + 1
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                views = views.to(self.device, non_blocking=True) if self.augment is not None and self.augment.view_count else None
                yield Batch(self.normalise(images), labels, positions.to(self.device, non_blocking=True), views)
        except DistillError as error:  # raised in a worker: keep the original one-line message
            raise DistillError(str(error).strip().splitlines()[-1].split("DistillError: ", 1)[-1]) from None
        self._order, self._drawn = None, 0


def split_bytes(*splits) -> int:
    """Bytes of the decoded uint8 images of in-memory splits."""
    return sum(split.images.nbytes for split in splits)


def choose_pipeline(cfg: DatasetConfig, splits: list, device: torch.device | None = None) -> str:
    """'device' or 'stream' for these splits: stream when a split is not in memory (a streamed image
    folder) or, with `pipeline=auto`, when the decoded images exceed `dataset.device_max_gb` (on a GPU,
    also a quarter of its memory, leaving the rest to the models)."""
    if any(not hasattr(split, "images") for split in splits):
        return "stream"
    if cfg.pipeline != "auto":
        return cfg.pipeline
    budget = cfg.device_max_gb * 2**30
    if device is not None and device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 4)
    return "device" if split_bytes(*splits) <= budget else "stream"


def build_loader(pipeline: str, split, info: DatasetInfo, batch_size: int, device: torch.device, *, workers=None, **options) -> Loader:
    """A `DeviceLoader` or a `StreamLoader` (with `workers`) over `split`; `options` as for `Loader`."""
    if pipeline == "device":
        return DeviceLoader(split, info, batch_size, device, **options)
    return StreamLoader(split, info, batch_size, device, workers=workers, **options)
