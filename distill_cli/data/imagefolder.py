"""Any image folder tree: `root/train/<class>/*` and optionally `root/test/<class>/*`.

For the device pipeline, images are decoded once (Pillow, in parallel threads) into a uint8
tensor cache under `dataset.cache_dir`, keyed by the folder, split and image size, and by a
fingerprint of the files (names, sizes, modification times): changing the tree rebuilds the cache.
For the stream pipeline (`dataset.pipeline=stream`, or `auto` when the decoded tree would exceed
`dataset.device_max_gb`) nothing is decoded up front: a `FileSplit` decodes each image when a
DataLoader worker asks for it. `dataset.crop=resized` (ImageNet-style) always streams: training cuts a
random-resized crop from each file at its own size, evaluation resizes it and takes the centre crop.
An ImageNet tree's `val/` serves as the test split where there is no `test/`.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..core.checkpoint import save_atomic
from ..core.config import DatasetConfig
from ..core.errors import DistillError
from . import DATASETS, Augment, DatasetInfo, RawDataset, Split, channel_stats
from .augment import image_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 1
STATS_SAMPLE = 2000  # images of a streamed tree that its normalisation statistics are computed from
CENTRE_CROP = 0.875  # dataset.crop=resized: evaluation's centre crop over the resized shorter side (224 / 256)


def _list_tree(folder: Path, classes: list[str]) -> dict[str, list[tuple[Path, int]]]:
    """The image files of each class folder under `folder` that exists, with their labels, by class."""
    files = {}
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            files[name] = [(p, label) for p in sorted(class_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return files


def _fingerprint(files: list[tuple[Path, int]], folder: Path) -> str:
    digest = hashlib.sha256()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def open_rgb(path: Path) -> Image.Image:
    """One image file decoded as an RGB Pillow image, or a one-line DistillError naming the file."""
    try:
        with Image.open(path) as file:
            return file.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DistillError(f"cannot decode image {path}: {error}") from None


def _decode(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """One image as uint8 RGB (3, H, W), resized (bilinear, antialiased) to size = (H, W) if given."""
    image = open_rgb(path)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image_tensor(image)


def _decode_centre(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """One image as ImageNet-style evaluation sees it: its shorter side resized to size / CENTRE_CROP (Pillow,
    bilinear), then the centre crop of `size` (H, W): torchvision's Resize(256) + CenterCrop(224) for size 224."""
    image = open_rgb(path)
    shorter, longer = sorted(image.size)
    side = round(min(size) / CENTRE_CROP)
    resized = side, int(side * longer / shorter)  # (shorter, longer), rounded as torchvision's Resize(side) does
    image = image.resize(resized if image.width <= image.height else resized[::-1], Image.Resampling.BILINEAR)
    top, left = round((image.height - size[0]) / 2), round((image.width - size[1]) / 2)
    return image_tensor(image.crop((left, top, left + size[1], top + size[0])))


def _decode_all(files: list[tuple[Path, int]], size: tuple[int, int] | None) -> Split:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda item: _decode(item[0], size), files))
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DistillError(f"images differ in size ({len(shapes)} shapes); set dataset.image_size to resize them")
    return Split(torch.stack(images), torch.tensor([label for _, label in files], dtype=torch.int64))


def _cached_split(folder: Path, files: list[tuple[Path, int]], cfg: DatasetConfig) -> Split:
    """The decoded split, from the tensor cache when its fingerprint still matches the files."""
    key_text = f"v{CACHE_VERSION}|{folder.resolve()}|{cfg.image_size}|{_fingerprint(files, folder)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache = Path(cfg.cache_dir) / f"imagefolder-{folder.name}-{key}.pt"
    if cache.is_file():
        try:
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            return Split(stored["images"], stored["labels"])
        except Exception:  # unreadable cache: rebuild it
            pass
    size = None if cfg.image_size is None else (cfg.image_size, cfg.image_size)
    split = _decode_all(files, size)
    save_atomic({"images": split.images, "labels": split.labels, "source": str(folder.resolve())}, cache)
    return split


@dataclass
class FileSplit:
    """An image-folder split read lazily: `image(i)` decodes file i as evaluation sees it, of `size` (H, W): the whole
    image resized (`crop` "resize"), or ImageNet's resize and centre crop ("centre"); `source(i)` is the file as it
    is, which dataset.crop=resized's training crops are cut from."""

    paths: list[Path]
    labels: torch.Tensor
    size: tuple[int, int]
    crop: str = "resize"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "FileSplit":
        return FileSplit([self.paths[i] for i in index.tolist()], self.labels[index], self.size, self.crop)

    def image(self, position: int) -> torch.Tensor:
        if self.crop == "centre":
            return _decode_centre(self.paths[position], self.size)
        return _decode(self.paths[position], self.size)

    def source(self, position: int) -> Image.Image:
        return open_rgb(self.paths[position])


def _file_split(files: list[tuple[Path, int]], size: tuple[int, int], crop: str) -> FileSplit:
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return FileSplit([path for path, _ in files], labels, size, crop)


def _list_split(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """The split's image files with their labels; a split without images or a class folder without images
    (torchvision's ImageFolder refuses it too) is refused, naming it."""
    by_class = _list_tree(folder, classes)
    if not any(by_class.values()):
        raise DistillError(f"dataset.root: no images under {folder}/<class>/ (expected e.g. {folder}/{classes[0]}/x.jpg)")
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        which = f"the class folder {folder / empty[0]} has" if len(empty) == 1 else f"the class folders {', '.join(empty)} of {folder} have"
        raise DistillError(f"dataset.root: {which} no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove {'it' if len(empty) == 1 else 'them'}")
    return [item for files in by_class.values() for item in files]


def _stream_size(files: list[tuple[Path, int]], cfg: DatasetConfig) -> tuple[int, int]:
    """(H, W) every image is resized to when streaming: dataset.image_size, else the first image's size."""
    if cfg.image_size is not None:
        return cfg.image_size, cfg.image_size
    return tuple(_decode(files[0][0], None).shape[1:])


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DatasetConfig) -> RawDataset:
    root = Path(cfg.root)
    train_dir, test_dir = root / "train", root / "test"
    if not test_dir.is_dir() and (root / "val").is_dir():  # ImageNet's layout: its validation set is the test split
        test_dir = root / "val"
    if not train_dir.is_dir():
        raise DistillError(
            f"dataset.root={root}: expected {train_dir}/<class>/<image> (and optionally {test_dir}/<class>/<image>); "
            f"point dataset.root at your image tree"
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DistillError(f"dataset.root={root}: {train_dir} has no class folders")
    folders = {"train": train_dir}
    if test_dir.is_dir():
        extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise DistillError(f"dataset.root={root}: test classes {extra} do not appear in train/")
        folders["test"] = test_dir
    files = {name: _list_split(folder, classes) for name, folder in folders.items()}
    size = _stream_size(files["train"], cfg)
    decoded_bytes = sum(len(listed) for listed in files.values()) * 3 * size[0] * size[1]
    stream = cfg.pipeline == "stream" or cfg.crop == "resized" or (cfg.pipeline == "auto" and decoded_bytes > cfg.device_max_gb * 2**30)
    if stream:
        crop = "centre" if cfg.crop == "resized" else "resize"
        splits = {name: _file_split(listed, size, crop) for name, listed in files.items()}
        if cfg.mean is not None:  # given (a pretrained teacher's): no need to decode a sample of the tree first
            mean, std = tuple(cfg.mean), tuple(cfg.std)
        else:
            sample = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(cfg.split_seed))
            mean, std = channel_stats(torch.stack([splits["train"].image(i) for i in sample[:STATS_SAMPLE].tolist()]))
    else:
        splits = {name: _cached_split(folders[name], listed, cfg) for name, listed in files.items()}
        mean, std = channel_stats(splits["train"].images)
    train, test = splits["train"], splits.get("test")
    height, width = train.image(0).shape[-2:]
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        channels=3,
        image_size=(height, width),
        mean=mean,
        std=std,
        class_names=tuple(classes),
        augment=Augment(flip=True, resized=True) if cfg.crop == "resized" else Augment(pad=max(1, min(height, width) // 8), flip=True),
    )
    return RawDataset(train=train, test=test, info=info)
