"""Datasets, splits, the image-folder tensor cache and on-device augmentation."""

import pickle
import struct
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run_distill_in_process, write_image_tree, write_png
from sklearn.datasets import load_digits

from distill_cli.core.config import DatasetConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import (
    DATASETS,
    Augment,
    DataSplits,
    RawDataset,
    Split,
    load_dataset,
    training_augment,
)
from distill_cli.data import digits as digits_module
from distill_cli.data import imagefolder as imagefolder_module
from distill_cli.data.augment import random_color_jitter, random_crop, random_flip
from distill_cli.data.loader import DeviceLoader

# ---------------------------------------------------------------- augmentation


def test_random_crop_matches_pad_then_slice():
    """The batched crop equals torchvision's RandomCrop(padding=pad): zero-pad, then a window."""
    images = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    pad = 3
    out = random_crop(images, pad, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 2 * pad + 1, (2, 16), generator=torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    for i in range(16):
        top, left = offsets[0, i], offsets[1, i]
        assert torch.equal(out[i], padded[i, :, top : top + 6, left : left + 6])


def test_random_flip_flips_about_half_and_exactly_mirrors():
    images = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).repeat(4000, 1, 1, 1)
    out = random_flip(images, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3)
    assert 0.45 < flipped.float().mean() < 0.55
    assert torch.equal(out[flipped][0, 0, 0], torch.tensor([3, 2, 1, 0], dtype=torch.uint8))
    assert torch.equal(out[~flipped][0, 0, 0], torch.tensor([0, 1, 2, 3], dtype=torch.uint8))


def test_color_jitter_is_torchvisions_brightness_contrast_saturation():
    """With the factors the generator draws, the batch equals torchvision's adjust_brightness, then
    adjust_contrast, then adjust_saturation (float maths), up to uint8 rounding."""
    from torchvision.transforms import functional as TF

    images = torch.randint(0, 256, (12, 3, 7, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = random_color_jitter(images, 0.5, torch.Generator().manual_seed(5))
    factors = torch.rand((3, 12), generator=torch.Generator().manual_seed(5)) + 0.5  # [0.5, 1.5)
    for image, got, (brightness, contrast, saturation) in zip(images, out, factors.T.tolist()):
        expected = TF.adjust_brightness(image.float() / 255, brightness)
        expected = TF.adjust_saturation(TF.adjust_contrast(expected, contrast), saturation)
        assert (got.float() - expected * 255).abs().max() <= 1.0
    grey = images[:, :1]
    assert torch.equal(random_color_jitter(grey, 0.0, torch.Generator()), grey)  # strength 0: unchanged


def test_training_augment_adds_color_jitter_to_the_preset_only_when_augmenting():
    info = load_dataset(DatasetConfig(name="digits")).info
    assert training_augment(DatasetConfig(name="digits"), info) is None
    on = DatasetConfig(name="digits", augment=True, color_jitter=0.2)
    assert training_augment(on, info) == Augment(pad=1, color_jitter=0.2)


def test_loader_augments_training_batches_reproducibly():
    data = load_dataset(DatasetConfig(name="digits"))
    def batches(seed):
        loader = DeviceLoader(data.train, data.info, 64, torch.device("cpu"), shuffle=True, seed=seed, augment=Augment(pad=1))
        return next(iter(loader))[0]
    plain = DeviceLoader(data.train, data.info, 64, torch.device("cpu"), shuffle=True, seed=0)
    assert torch.equal(batches(0), batches(0))
    assert not torch.equal(batches(0), next(iter(plain))[0])  # augmentation changed the images
    assert batches(0).shape == (64, 1, 8, 8)


# ---------------------------------------------------------------- splits and classes


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    """The images and labels scikit-learn's load_digits gives (scaled 0..16 -> 0..255), from its CSV."""
    raw = digits_module.load_digits(DatasetConfig(name="digits"))
    reference = load_digits()
    expected = torch.as_tensor(reference.images, dtype=torch.float32).mul(255 / 16).round().to(torch.uint8)
    assert torch.equal(raw.train.images, expected.unsqueeze(1))
    assert torch.equal(raw.train.labels, torch.as_tensor(reference.target, dtype=torch.int64))
    monkeypatch.setattr(digits_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillError, match=r"^dataset=digits: scikit-learn's digits file .* is not installed"):
        digits_module.load_digits(DatasetConfig(name="digits"))


def test_digits_splits_have_the_configured_sizes():
    data = load_dataset(DatasetConfig(name="digits"))
    assert (len(data.train), len(data.val), len(data.test)) == (1294, 144, 359)
    assert data.info.num_classes == 10 and data.info.channels == 1 and data.info.image_size == (8, 8)
    no_val = load_dataset(DatasetConfig(name="digits", val_split=0.0))
    assert len(no_val.val) == 0 and len(no_val.train) == 1294 + 144


def test_exclude_classes_drops_them_from_training_only():
    data = load_dataset(DatasetConfig(name="digits", exclude_classes=[3, 7]))
    assert not torch.isin(data.train.labels, torch.tensor([3, 7])).any()
    assert (data.test.labels == 3).sum() > 0 and (data.val.labels == 7).sum() > 0
    full = load_dataset(DatasetConfig(name="digits"))
    assert torch.equal(full.test.labels, data.test.labels)


def test_exclude_classes_rejects_unknown_class():
    with pytest.raises(DistillError, match="dataset.exclude_classes: class 12 does not exist"):
        load_dataset(DatasetConfig(name="digits", exclude_classes=[12]))


def test_synthetic_has_the_configured_shape():
    data = load_dataset(DatasetConfig(name="synthetic", num_classes=7, channels=2, image_size=12, train_size=300, test_size=50))
    assert data.train.images.shape[1:] == (2, 12, 12) and data.train.images.dtype == torch.uint8
    assert data.info.num_classes == 7 and int(data.train.labels.max()) <= 6
    assert len(data.test) == 50 and len(data.train) + len(data.val) == 300


def test_unknown_dataset_suggests_names():
    with pytest.raises(DistillError, match="unknown dataset 'cifar': did you mean"):
        load_dataset(DatasetConfig(name="cifar"))


# ---------------------------------------------------------------- torchvision datasets


def _write_idx(path: Path, array: torch.Tensor, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def _fake_mnist(root: Path, folder: str, n_train=120, n_test=40) -> None:
    """Files in MNIST's own (idx) format, the layout torchvision reads: root/<folder>/raw/."""
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images, 0x0803)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels, 0x0801)


def _fake_cifar10(root: Path, monkeypatch, n_per_batch=8, n_test=10) -> None:
    """CIFAR-10's pickled batches (root/cifar-10-batches-py/), random images; torchvision's md5 check is
    bypassed (the files are not the real ones)."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: Path(path).is_file())
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for name, n in [*((f"data_batch_{i}", n_per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8, generator=generator).numpy()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": [i % 10 for i in range(n)]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def _fake_svhn(root: Path, monkeypatch, n_train=60, n_test=20) -> None:
    """SVHN's .mat files (X: H x W x C x N, y: labels 1..10), random images; md5 check bypassed."""
    from scipy.io import savemat

    monkeypatch.setattr("torchvision.datasets.svhn.check_integrity", lambda path, md5=None: Path(path).is_file())
    generator = torch.Generator().manual_seed(0)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        images = torch.randint(0, 256, (32, 32, 3, n), dtype=torch.uint8, generator=generator).numpy()
        savemat(root / name, {"X": images, "y": (torch.arange(n) % 10 + 1).view(n, 1).numpy()})


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_datasets_load_through_torchvision(tmp_path, name, folder):
    _fake_mnist(tmp_path, folder)
    data = load_dataset(DatasetConfig(name=name, root=str(tmp_path), download=False))
    assert data.info.channels == 1 and data.info.image_size == (28, 28) and data.info.num_classes == 10
    assert len(data.test) == 40 and len(data.train) + len(data.val) == 120
    assert data.train.images.shape[1:] == (1, 28, 28)
    assert data.info.augment == Augment(pad=2)  # +-2 pixel jitter


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn"])
def test_missing_files_without_download_say_where_and_how(tmp_path, name):
    with pytest.raises(DistillError, match=rf"dataset {name}: files not found under {tmp_path}/ .*dataset.download=true"):
        load_dataset(DatasetConfig(name=name, root=str(tmp_path), download=False))


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DistillError, match="could not download into .*no network"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=True))


def test_cli_reports_missing_dataset_in_one_line(tmp_path):
    result = run_distill_in_process("train", "dataset=cifar10", f"dataset.root={tmp_path / 'none'}", "dataset.download=false", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "files not found under" in line


# ---------------------------------------------------------------- image folders


def test_imagefolder_loads_tree_and_caches_decoded_tensors(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "tree", "train", 20)
    write_image_tree(tmp_path / "tree", "test", 5)
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))
    data = load_dataset(cfg)
    assert data.info.class_names == ("cat", "dog", "eel") and data.info.num_classes == 3
    assert data.info.image_size == (10, 10) and data.info.channels == 3
    assert len(data.test) == 15 and len(data.train) + len(data.val) == 60
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and test

    # the second load reads the cache: decoding is not called again
    monkeypatch.setattr(imagefolder_module, "_decode_all", lambda *a: pytest.fail("decoded again"))
    cached = load_dataset(cfg)
    assert torch.equal(cached.train.images, data.train.images)
    monkeypatch.undo()

    # changing the source rebuilds: a new image in train
    write_png(torch.zeros(3, 10, 10, dtype=torch.uint8), tmp_path / "tree" / "train" / "cat" / "new.png")
    rebuilt = load_dataset(cfg)
    assert len(rebuilt.train) + len(rebuilt.val) == 61


def test_imagefolder_resizes_and_carves_a_test_split(tmp_path):
    write_image_tree(tmp_path / "tree", "train", 20, size=12)
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=8, cache_dir=str(tmp_path / "c"))
    data = load_dataset(cfg)
    assert data.train.images.shape[1:] == (3, 8, 8)
    assert len(data.test) == 12  # 20% of 60


def test_imagefolder_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(DistillError, match=r"expected .*/train/<class>/<image>"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "c")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DistillError, match="no images under"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "c")))


def test_imagefolder_refuses_a_class_folder_without_images_naming_it(tmp_path):
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "c"), image_size=8)
    write_image_tree(tmp_path, "train", 12, classes=("a", "c"))
    (tmp_path / "train" / "b").mkdir()  # 12 images in a/ and c/, none in b/: b is not silently left out
    with pytest.raises(DistillError, match=rf"^dataset.root: the class folder {tmp_path}/train/b has no images \(.bmp, .gif, "):
        load_dataset(cfg)
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "d").mkdir()
    with pytest.raises(DistillError, match=rf"^dataset.root: the class folders b, d of {tmp_path}/train have no images"):
        load_dataset(cfg)
    write_image_tree(tmp_path, "train", 12, classes=("b", "d"))  # (the colours of a and c: images alike will do)
    write_image_tree(tmp_path, "test", 2, classes=("a",))
    (tmp_path / "test" / "c").mkdir()  # a test class may be missing, but not a folder of it without images
    with pytest.raises(DistillError, match=rf"^dataset.root: the class folder {tmp_path}/test/c has no images"):
        load_dataset(cfg)
    (tmp_path / "test" / "c").rmdir()
    assert load_dataset(cfg).info.class_names == ("a", "b", "c", "d")


@pytest.mark.parametrize(
    "cfg",
    [
        lambda tmp_path: write_image_tree(tmp_path, "train", 12, classes=("a",))
        or DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "c")),
        lambda tmp_path: DatasetConfig(name="synthetic", num_classes=1, channels=1, image_size=4, train_size=20, test_size=5),
    ],
    ids=["imagefolder", "synthetic"],
)
def test_a_dataset_of_one_class_is_refused(cfg, tmp_path):
    with pytest.raises(DistillError, match=r"^dataset (imagefolder|synthetic) has 1 class \((a|0)\); classification needs at least 2$"):
        load_dataset(cfg(tmp_path))


# ---------------------------------------------------------------- splits of every dataset


def _source_positions(data: DataSplits, raw: RawDataset) -> dict[str, list[int]]:
    """Where each image of the train/val/test splits sits in the loader's own images (train, then test).

    The source images are all distinct, so an image identifies its position; the labels must travel with it.
    """
    source = raw.train
    if raw.test is not None:
        source = Split(torch.cat([raw.train.images, raw.test.images]), torch.cat([raw.train.labels, raw.test.labels]))
    position_of = {image.numpy().tobytes(): i for i, image in enumerate(source.images)}
    assert len(position_of) == len(source), "the source images must be distinct to be traced"
    positions = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        positions[name] = [position_of[image.numpy().tobytes()] for image in split.images]
        assert torch.equal(split.labels, source.labels[positions[name]]), f"{name}: labels do not follow their images"
    return positions


def _assert_splits_partition_the_source(positions: dict[str, list[int]], raw: RawDataset) -> None:
    """train/val/test are pairwise disjoint and together hold every source image exactly once."""
    n_train = len(raw.train)
    n_source = n_train + (0 if raw.test is None else len(raw.test))
    for name, part in positions.items():
        assert len(set(part)) == len(part), f"{name} holds an image twice"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(positions[a]) & set(positions[b]), f"{a} and {b} share images"
    assert sorted(sum(positions.values(), [])) == list(range(n_source)), "the splits drop images"
    if raw.test is not None:  # a shipped test split is used as it is
        assert sorted(positions["test"]) == list(range(n_train, n_source))


def _digits_config(tmp_path, monkeypatch) -> DatasetConfig:
    return DatasetConfig(name="digits")


def _synthetic_config(tmp_path, monkeypatch) -> DatasetConfig:
    return DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=6, train_size=200, test_size=40)


def _imagefolder_config(tmp_path, monkeypatch, with_test: bool) -> DatasetConfig:
    write_image_tree(tmp_path / "tree", "train", 20)
    if with_test:
        write_image_tree(tmp_path / "tree", "test", 5)
    return DatasetConfig(name="imagefolder", root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))


def _mnist_config(tmp_path, monkeypatch) -> DatasetConfig:
    _fake_mnist(tmp_path, "MNIST")
    return DatasetConfig(name="mnist", root=str(tmp_path), download=False)


def _cifar10_config(tmp_path, monkeypatch) -> DatasetConfig:
    _fake_cifar10(tmp_path, monkeypatch)
    return DatasetConfig(name="cifar10", root=str(tmp_path), download=False)


def _svhn_config(tmp_path, monkeypatch) -> DatasetConfig:
    _fake_svhn(tmp_path, monkeypatch)
    return DatasetConfig(name="svhn", root=str(tmp_path), download=False)


SPLIT_CASES = {
    "digits": _digits_config,
    "synthetic": _synthetic_config,
    "imagefolder-carved-test": partial(_imagefolder_config, with_test=False),
    "imagefolder-with-test": partial(_imagefolder_config, with_test=True),
    "mnist": _mnist_config,
    "cifar10": _cifar10_config,
    "svhn": _svhn_config,
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_splits_are_disjoint_seeded_and_complete(case, tmp_path, monkeypatch):
    """Every image lands in exactly one of train/val/test; the held-out splits depend on split_seed only."""
    cfg = SPLIT_CASES[case](tmp_path, monkeypatch)
    raw = DATASETS.get(cfg.name)(cfg)
    positions = _source_positions(load_dataset(cfg), raw)
    _assert_splits_partition_the_source(positions, raw)
    assert len(positions["val"]) == round((len(positions["train"]) + len(positions["val"])) * cfg.val_split) > 0
    assert _source_positions(load_dataset(cfg), raw) == positions  # the same seed: the same splits, in order

    reseeded = replace(cfg, split_seed=1)
    other_raw = DATASETS.get(cfg.name)(reseeded)  # synthetic data is generated from the seed too
    other = _source_positions(load_dataset(reseeded), other_raw)
    _assert_splits_partition_the_source(other, other_raw)
    held_out = ("val", "test") if raw.test is None else ("val",)
    for name in held_out:
        assert set(other[name]) != set(positions[name]), f"{name} ignores split_seed"
