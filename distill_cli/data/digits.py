"""scikit-learn's handwritten digits (UCI ML digits): 1,797 8x8 grey images, 10 classes, no network needed.

Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixel values 0..16 and the
label per row, what its `load_digits` parses) without importing scikit-learn, which costs every `distill`
process that trains on the digits about 1.3 s of start-up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..core.config import DatasetConfig
from ..core.errors import DistillError
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split, channel_stats


def digits_file() -> Path:
    """The digits CSV inside the installed scikit-learn (found without importing it)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DistillError("dataset=digits: scikit-learn's digits file (sklearn/datasets/data/digits.csv.gz) is not installed; pip install scikit-learn")
    return path


@DATASETS.register("digits")
def load_digits(cfg: DatasetConfig) -> RawDataset:
    rows = torch.as_tensor(np.loadtxt(digits_file(), delimiter=","), dtype=torch.float32)
    # pixel values are 0..16; scale to the uint8 range every dataset uses
    pixels = rows[:, :-1].reshape(-1, 8, 8).mul(255 / 16).round().to(torch.uint8)
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
    return RawDataset(train=Split(images, rows[:, -1].to(torch.int64)), test=None, info=info)
