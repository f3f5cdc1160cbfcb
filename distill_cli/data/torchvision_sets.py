"""MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN through torchvision's own dataset classes.

Files live under `dataset.root` in torchvision's layout and are downloaded there when
`dataset.download=true` (the default, for users with a network). Normalisation statistics are the
published per-channel training-set values used across the KD literature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.config import DatasetConfig
from ..core.errors import DistillError
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split


@dataclass(frozen=True)
class TorchvisionSpec:
    class_name: str  # in torchvision.datasets
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment
    split_argument: bool = False  # SVHN takes split="train"/"test" instead of train=True/False


SPECS = {
    "mnist": TorchvisionSpec("MNIST", 1, 28, (0.1307,), (0.3081,), Augment(pad=2)),
    "fashion_mnist": TorchvisionSpec("FashionMNIST", 1, 28, (0.2860,), (0.3530,), Augment(pad=2)),
    "cifar10": TorchvisionSpec(
        "CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), Augment(pad=4, flip=True)
    ),
    "cifar100": TorchvisionSpec(
        "CIFAR100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), Augment(pad=4, flip=True)
    ),
    # no flip: a mirrored house number is a different (or no) digit
    "svhn": TorchvisionSpec(
        "SVHN", 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), Augment(pad=4), split_argument=True
    ),
}


def _open(name: str, spec: TorchvisionSpec, cfg: DatasetConfig, train: bool):
    """Instantiate the torchvision dataset, turning missing files or a failed download into one line."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, spec.class_name)
    split = {"split": "train" if train else "test"} if spec.split_argument else {"train": train}
    root = Path(cfg.root)
    try:
        return dataset_class(str(root), download=cfg.download, **split)
    except RuntimeError as error:
        if cfg.download:
            raise DistillError(f"dataset {name}: files under {root} are incomplete or corrupt ({error})") from None
        raise DistillError(
            f"dataset {name}: files not found under {root}/ (dataset.download=false); run once with "
            f"dataset.download=true on a machine with a network, or copy torchvision's {spec.class_name} files "
            f"there, or point dataset=imagefolder at a folder of images"
        ) from None
    except OSError as error:  # URLError, DNS failure, connection refused, ...
        reason = getattr(error, "reason", None) or error
        raise DistillError(
            f"dataset {name}: could not download into {root}/ ({reason}); without a network copy torchvision's "
            f"{spec.class_name} files there and set dataset.download=false"
        ) from None


def _as_split(dataset) -> Split:
    images = dataset.data
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if images.ndim == 3:  # MNIST-like: (N, H, W)
        images = images.unsqueeze(1)
    elif images.shape[-1] == 3:  # CIFAR: (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # SVHN
    return Split(images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _loader(name: str):
    spec = SPECS[name]

    def load(cfg: DatasetConfig) -> RawDataset:
        train_set = _open(name, spec, cfg, train=True)
        test_set = _open(name, spec, cfg, train=False)
        classes = getattr(train_set, "classes", None) or [str(i) for i in range(10)]
        info = DatasetInfo(
            name=name,
            num_classes=len(classes),
            channels=spec.channels,
            image_size=(spec.size, spec.size),
            mean=spec.mean,
            std=spec.std,
            class_names=tuple(str(c) for c in classes),
            augment=spec.augment,
        )
        return RawDataset(train=_as_split(train_set), test=_as_split(test_set), info=info)

    load.__doc__ = f"torchvision's {spec.class_name} as uint8 tensors."
    return load


for _name in SPECS:
    DATASETS.register(_name)(_loader(_name))
