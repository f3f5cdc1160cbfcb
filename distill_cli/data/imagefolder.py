"""Any image folder tree: `root/train/<class>/*` and optionally `root/test/<class>/*`.

Images are decoded once (Pillow, in parallel threads) into a uint8
tensor cache under `dataset.cache_dir`, keyed by the folder, split and image size, and by a
fingerprint of the files (names, sizes, modification times): changing the tree rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save_atomic
from ..config import DatasetConfig
from ..errors import DistillError
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split, channel_stats

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 1


def _list_tree(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            files += [(p, label) for p in sorted(class_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return files


def _fingerprint(files: list[tuple[Path, int]], folder: Path) -> str:
    digest = hashlib.sha256()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(path: Path, size: int | None) -> torch.Tensor:
    """One image as uint8 RGB (3, H, W), resized (bilinear, antialiased) to size x size if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            image = file.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DistillError(f"cannot decode image {path}: {error}") from None
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _decode_all(files: list[tuple[Path, int]], size: int | None) -> Split:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda item: _decode(item[0], size), files))
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DistillError(f"images differ in size ({len(shapes)} shapes); set dataset.image_size to resize them")
    return Split(torch.stack(images), torch.tensor([label for _, label in files], dtype=torch.int64))


def _cached_split(folder: Path, classes: list[str], cfg: DatasetConfig) -> Split:
    """The decoded split, from the tensor cache when its fingerprint still matches the files."""
    files = _list_tree(folder, classes)
    if not files:
        raise DistillError(f"dataset.root: no images under {folder}/<class>/ (expected e.g. {folder}/{classes[0]}/x.jpg)")
    key_text = f"v{CACHE_VERSION}|{folder.resolve()}|{cfg.image_size}|{_fingerprint(files, folder)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache = Path(cfg.cache_dir) / f"imagefolder-{folder.name}-{key}.pt"
    if cache.is_file():
        try:
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            return Split(stored["images"], stored["labels"])
        except Exception:  # unreadable cache: rebuild it
            pass
    split = _decode_all(files, cfg.image_size)
    save_atomic({"images": split.images, "labels": split.labels, "source": str(folder.resolve())}, cache)
    return split


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DatasetConfig) -> RawDataset:
    root = Path(cfg.root)
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DistillError(
            f"dataset.root={root}: expected {train_dir}/<class>/<image> (and optionally {test_dir}/<class>/<image>); "
            f"point dataset.root at your image tree"
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DistillError(f"dataset.root={root}: {train_dir} has no class folders")
    train = _cached_split(train_dir, classes, cfg)
    test = None
    if test_dir.is_dir():
        extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise DistillError(f"dataset.root={root}: test classes {extra} do not appear in train/")
        test = _cached_split(test_dir, classes, cfg)
    height, width = train.images.shape[-2:]
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        channels=train.images.shape[1],
        image_size=(height, width),
        mean=mean,
        std=std,
        class_names=tuple(classes),
        augment=Augment(pad=max(1, min(height, width) // 8), flip=True),
    )
    return RawDataset(train=train, test=test, info=info)
