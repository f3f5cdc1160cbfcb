"""ImageNet-style image folders (`dataset.crop=resized`): files of any size, a random-resized crop for training and
resize + centre crop for evaluation, torchvision's ImageNet recipe and its presets (configs/experiment/imagenet_*),
and the top-5 accuracy reported from 100 classes on."""

import numpy as np
import pytest
import torch
from conftest import compose_config, run_distill_in_process, small_kd_config
from PIL import Image
from torchvision import transforms as classic
from torchvision.models import resnet34

from distill_cli.core.config import DatasetConfig, validate_config
from distill_cli.core.console import results_table
from distill_cli.core.errors import DistillError
from distill_cli.data import Augment, imagefolder, load_dataset, training_augment
from distill_cli.data.augment import RESIZED_RATIO, RESIZED_SCALE, augment_one, resized_crop_box
from distill_cli.data.imagefolder import FileSplit
from distill_cli.data.loader import Batch, build_loader
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.compute import Compute
from distill_cli.training.metrics import evaluate

pytestmark = pytest.mark.usefixtures("quiet_results")

SIZE = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """JPEGs of 3 classes at sizes from 30 x 30 to 69 x 89 (and one 200 x 20 strip), in ImageNet's layout:
    train/<wnid>/ and val/<wnid>/, no test/."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                height, width = (20, 200) if (split, label, k) == ("train", 0, 0) else (int(rng.integers(30, 70)), int(rng.integers(30, 90)))
                pixels = rng.integers(0, 60, (height, width, 3)) + np.eye(3, dtype=int)[label] * 180
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.jpg")
    return root


def _cfg(tree, **changes) -> DatasetConfig:
    values = {"name": "imagefolder", "root": str(tree), "image_size": SIZE, "crop": "resized", "augment": True, "val_split": 0.0}
    return DatasetConfig(**{**values, **changes})


@pytest.mark.parametrize("shape", [(50, 70), (20, 200), (300, 20), (64, 64)])
def test_the_crop_box_is_torchvisions_random_resized_crop_drawn_from_our_generator(shape):
    """Drawn from a generator seeded s, the box is the one torchvision's RandomResizedCrop.get_params draws from the
    global generator seeded s (the same draws in the same order), over 200 seeds: the extreme strips reach the
    centre-crop fallback. Its area share and aspect ratio stay in torchvision's ranges."""
    height, width = shape
    image = Image.new("RGB", (width, height))
    for seed in range(200):
        torch.manual_seed(seed)
        expected = classic.RandomResizedCrop.get_params(image, list(RESIZED_SCALE), list(RESIZED_RATIO))
        box = resized_crop_box(height, width, torch.Generator().manual_seed(seed))
        assert box == tuple(expected), seed
        top, left, crop_height, crop_width = box
        assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width


def test_a_training_sample_is_torchvisions_crop_and_flip_of_the_file(tree):
    """`augment_one` of a file with the resized preset: torchvision's RandomResizedCrop(24) then
    RandomHorizontalFlip on the Pillow image, seeded alike, to the pixel (the same Pillow resize)."""
    image = Image.open(next((tree / "train" / "n01443537").iterdir())).convert("RGB")
    reference = classic.Compose([classic.RandomResizedCrop(SIZE), classic.RandomHorizontalFlip(), classic.PILToTensor()])
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(image)
        ours = augment_one(image, Augment(flip=True, resized=True), torch.Generator().manual_seed(seed), (SIZE, SIZE))
        assert ours.dtype == torch.uint8 and torch.equal(ours, expected), seed


def test_evaluation_resizes_the_shorter_side_then_takes_the_centre_crop(tree):
    """The test split (ImageNet's val/, as there is no test/) and every split's `image(i)`: torchvision's
    Resize(round(24 / 0.875)) + CenterCrop(24), to the pixel; the training split's preset is the resized crop."""
    data = load_dataset(_cfg(tree))
    assert len(data.train) == 36 and len(data.test) == 12 and data.info.image_size == (SIZE, SIZE)
    assert data.info.augment == Augment(flip=True, resized=True) and data.info.augment.view_count == 0
    reference = classic.Compose([classic.Resize(round(SIZE / 0.875)), classic.CenterCrop(SIZE), classic.PILToTensor()])
    for split in (data.test, data.train):
        for position in (0, len(split) - 1):
            expected = reference(Image.open(split.paths[position]).convert("RGB"))
            assert torch.equal(split.image(position), expected)


def test_the_stream_loader_gives_seeded_crops_of_the_files(tree, monkeypatch):
    """Training batches from the stream pipeline: image_size crops of the files at their own size (never of the
    evaluation's centre crop), the same for the same seed, others in the next epoch; no view numbers (the crops come
    from a continuum)."""
    cfg = _cfg(tree)
    data = load_dataset(cfg)
    augment = training_augment(cfg, data.info)

    def evaluation_view(split, position):
        raise AssertionError("a training crop was cut from the evaluation view")

    monkeypatch.setattr(FileSplit, "image", evaluation_view)

    def epochs(seed):
        loader = build_loader("stream", data.train, data.info, 12, torch.device("cpu"), workers=0, shuffle=True, drop_last=True, seed=seed, augment=augment)
        return [[batch.images for batch in loader] for _ in range(2)]

    first, again = epochs(0), epochs(0)
    assert all(images.shape == (12, 3, SIZE, SIZE) for epoch in first for images in epoch)
    assert all(torch.equal(a, b) for ea, eb in zip(first, again) for a, b in zip(ea, eb))
    assert not torch.equal(first[0][0], first[1][0])
    assert all(batch.view is None for batch in build_loader("stream", data.train, data.info, 12, torch.device("cpu"), workers=0, augment=augment))


def test_the_normalisation_can_be_given(tree, monkeypatch):
    """dataset.mean / dataset.std replace the measured statistics (a pretrained teacher's), and a streamed tree then
    decodes no sample to measure them; a count that is not the channels' is one line."""
    measured = load_dataset(_cfg(tree)).info
    monkeypatch.setattr(imagefolder, "channel_stats", lambda images: pytest.fail("measured the given statistics"))
    given = load_dataset(_cfg(tree, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])).info
    assert given.mean == (0.485, 0.456, 0.406) and given.std == (0.229, 0.224, 0.225) and measured.mean != given.mean
    with pytest.raises(DistillError, match=r"^dataset.mean: 1 values for 3 channels of dataset imagefolder$"):
        load_dataset(_cfg(tree, mean=[0.5], std=[0.2]))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "synthetic", "num_classes": 3, "channels": 3, "train_size": 8, "test_size": 8}, "dataset.crop: resized is for image folders"),
        ({"image_size": None}, "dataset.crop: resized is for image folders"),
        ({"pipeline": "device"}, "dataset.crop: resized is for image folders"),
        ({"crop": "random"}, "dataset.crop: 'random' is not one of pad, resized"),
        ({"mean": [0.5, 0.5, 0.5]}, "dataset.mean: and dataset.std come together"),
        ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, r"dataset.std: must be > 0"),
    ],
)
def test_bad_settings_are_one_line(tree, changes, message):
    with pytest.raises(DistillError, match=f"^{message}"):
        _cfg(tree, **changes)


def test_views_drawn_once_are_refused_with_resized_crops(tree):
    cfg = _cfg(tree)
    with pytest.raises(DistillError, match=r"^teacher_views: views drawn once are pad crops and flips; dataset.crop=resized"):
        training_augment(cfg, load_dataset(cfg).info, drawn=4)


def test_bench_times_resized_crops_against_torchvisions_own(tree, tmp_path):
    """`distill bench` on an ImageNet-style folder: the reference loop is torchvision's RandomResizedCrop + flip on
    the files (even with reference_from_files=false: the crops are cut from the files), and says so."""
    result = run_distill_in_process(
        "bench", "dataset=imagefolder", f"dataset.root={tree}", f"dataset.image_size={SIZE}", "dataset.crop=resized",
        "teacher.kwargs.width=4", "student=mlp", "student.kwargs.hidden=[8]", "batch_size=8", "warmup_steps=1", "steps=2",
        "repeats=1", "reference_workers=0", "reference_from_files=false", cwd=tmp_path,
    )
    output = " ".join(result.stdout.split())
    assert "augmentation (both): random-resized crop, flip" in output
    assert "reads torchvision ImageFolder, 36 files decoded per sample" in output and "stream pipeline" in output


@pytest.mark.parametrize("classes, top5", [(100, 0.75), (10, None)])
def test_top5_accuracy_is_measured_from_100_classes(classes, top5):
    """The label ranked 1st, 4th, 7th and 5th by its row's logits: top-1 0.25, top-5 0.75; not measured at 10 classes."""
    logits = torch.arange(classes, 0, -1, dtype=torch.float32).repeat(4, 1)  # class k ranked k + 1 in every row
    labels = torch.tensor([0, 3, 6, 4])
    loader = [Batch(logits, labels, torch.arange(4))]
    accuracy = evaluate(torch.nn.Identity(), loader, Compute(torch.device("cpu"), "fp32"), classes)
    assert accuracy.overall == 0.25 and accuracy.top5 == top5


def test_a_kd_run_of_100_classes_reports_top5_for_each_network(tmp_path):
    """Teacher, student and the student alone each carry their top-5 test accuracy in the summary, and the results
    table's caption lists them."""
    data = DatasetConfig(name="synthetic", num_classes=100, channels=3, image_size=8, train_size=400, test_size=200, val_split=0.1)
    summary = run_kd(small_kd_config(tmp_path, dataset=data, epochs=1, teacher_epochs=1), tmp_path / "kd")
    top5 = [summary["teacher"]["test_acc_top5"], summary["student"]["test_acc_top5_best"], summary["baseline"]["test_acc_top5_best"]]
    assert all(0 <= value <= 1 for value in top5)
    assert summary["teacher"]["test_acc_top5"] >= summary["teacher"]["test_acc"]
    caption = str(results_table(summary).caption)
    assert caption.endswith(f"top-5 test acc: teacher {top5[0]:.2%}, student {top5[1]:.2%}, student alone {top5[2]:.2%}")


@pytest.mark.slow
def test_the_imagenet_presets_train_on_an_imagenet_tree(tree, tmp_path):
    """`distill train experiment=imagenet_resnet18`, then `distill kd experiment=imagenet_resnet34_resnet18` with
    the teacher from a plain torchvision state dict (as torchvision's released weights are), on the small tree at
    24 x 24: the baseline comes from train's cache, the kd run completes, and the recipe is torchdistill's."""
    shrink = [f"dataset.root={tree}", f"dataset.image_size={SIZE}", "batch_size=12", "epochs=1", "dataset.val_split=0.2",
              "dataset.workers=0", "device=cpu", f"teacher_cache={tmp_path / 'cache'}"]
    train = validate_config("train", compose_config("train", ["experiment=imagenet_resnet18", *shrink]))
    assert (train.optimizer.lr, train.optimizer.weight_decay, train.dataset.crop) == (0.1, 1e-4, "resized")
    run_train(train, tmp_path / "resnet18")
    torch.save(resnet34(num_classes=3).state_dict(), tmp_path / "resnet34.pth")
    kd = validate_config("kd", compose_config("kd", ["experiment=imagenet_resnet34_resnet18", *shrink, f"teacher.checkpoint={tmp_path / 'resnet34.pth'}"]))
    assert (kd.T, kd.alpha) == (1.0, 0.5)
    summary = run_kd(kd, tmp_path / "kd")
    assert summary["status"] == "completed"
    assert (summary["teacher"]["source"], summary["baseline"]["source"]) == ("checkpoint", "cache")
