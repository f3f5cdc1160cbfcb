"""Integration test on real data: a per-class subset of the real CIFAR-10 (JPEGs) as an image folder."""

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_distill

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
TRAIN_PER_CLASS, TEST_PER_CLASS = 200, 50

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE}"),
]


def extract_subset(archive: Path, target: Path, per_split: dict[str, int]) -> None:
    """Extract the first `per_split[split]` images of each class of train/ and test/ into `target`."""
    taken: Counter = Counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_split:
                continue
            split, label = parts[0], parts[1]
            if taken[split, label] < per_split[split]:
                taken[split, label] += 1
                tar.extract(member, target, filter="data")


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10-subset")
    extract_subset(ARCHIVE, root, {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})
    return root


def test_train_and_kd_on_real_cifar10_jpegs(cifar_subset, tmp_path):
    classes = sorted(p.name for p in (cifar_subset / "train").iterdir())
    assert len(classes) == 10 and all(len(list((cifar_subset / "test" / c).iterdir())) == TEST_PER_CLASS for c in classes)
    data = ["dataset=imagefolder", f"dataset.root={cifar_subset}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    recipe = ["teacher.kwargs.width=16", "epochs=4"]
    run_distill("train", *data, *recipe, cwd=tmp_path)
    run_distill("kd", *data, *recipe, "teacher_epochs=4", "student=mlp_small", cwd=tmp_path)
    (train_summary,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/*_train/summary.json")]
    (kd_summary,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/*_kd/summary.json")]
    teacher = train_summary["teacher"]
    assert train_summary["dataset"] == "imagefolder"
    assert list(teacher["test_acc_per_class"]) == classes
    # 10 balanced classes: chance is 10%; a few epochs on 1,800 real images do clearly better
    assert teacher["test_acc_best"] > 0.25
    assert kd_summary["teacher"]["source"] == "cache"
    assert kd_summary["student"]["test_acc_best"] > 0.2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # decoded once, reused by kd
