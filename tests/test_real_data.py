"""Integration test on real data: a per-class subset of the real CIFAR-10 (JPEGs) as an image folder.

The archive lives in `shared/data/` beside the repository (CI clones the repo next to `shared/`). Where
that folder exists, or `CI` is set, missing or unreadable data fails the test; elsewhere it is skipped.
"""

import json
import os
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pytest
from conftest import run_distill_in_process

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARCHIVE = SHARED / "data" / "cifar10-jpg.tar.gz"
TRAIN_PER_CLASS, TEST_PER_CLASS = 200, 50


def data_unavailable(reason: str, shared: Path = SHARED) -> NoReturn:
    """Fail where the data must be there (a `shared` folder beside the repo, as in CI, or `CI` set); else skip."""
    if shared.is_dir() or "CI" in os.environ:
        why = f"{shared}/ exists beside the repo (the CI layout)" if shared.is_dir() else "CI is set"
        pytest.fail(f"{reason}; the real-data test must run here: {why}", pytrace=False)
    pytest.skip(f"{reason} (no {shared}/ beside the repo and CI not set)")


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


def extract_cifar_subset(target: Path, archive: Path = ARCHIVE, shared: Path = SHARED) -> Path:
    """`target` with TRAIN_PER_CLASS / TEST_PER_CLASS images per class of the archive, or a failure or skip."""
    if not archive.is_file():
        data_unavailable(f"real CIFAR-10 archive not found at {archive}", shared)
    try:
        extract_subset(archive, target, {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        data_unavailable(f"real CIFAR-10 archive {archive} is unreadable ({error})", shared)
    return target


FAIL_OR_SKIP = (pytest.fail.Exception, pytest.skip.Exception)  # caught, so that a skip cannot pass for a pass


@pytest.mark.parametrize("shared_exists, ci, outcome", [(True, False, "fail"), (False, True, "fail"), (False, False, "skip")])
def test_missing_real_data_fails_in_the_ci_layout_and_skips_elsewhere(tmp_path, monkeypatch, shared_exists, ci, outcome):
    shared = tmp_path / "shared"
    if shared_exists:
        (shared / "data").mkdir(parents=True)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    with pytest.raises(FAIL_OR_SKIP, match="real CIFAR-10 archive not found at") as raised:
        extract_cifar_subset(tmp_path / "subset", shared / "data" / "cifar10-jpg.tar.gz", shared)
    assert raised.type is (pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception)


def test_an_unreadable_archive_fails_in_the_ci_layout(tmp_path):
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    archive = shared / "data" / "cifar10-jpg.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"not gzip data" * 100)
    with pytest.raises(FAIL_OR_SKIP, match="real CIFAR-10 archive .* is unreadable") as raised:
        extract_cifar_subset(tmp_path / "subset", archive, shared)
    assert raised.type is pytest.fail.Exception


VEHICLES = ("airplane", "automobile", "ship", "truck")  # told apart by shape and background: learnt first


def assert_per_class_accuracies(model: dict, overall: float, classes: list[str]) -> None:
    """Per-class test accuracies: one per class, in [0, 1], averaging to the overall accuracy (the test
    subset is balanced); better than chance (0.1) on at least half the classes, and clearly on the vehicles."""
    per_class = model["test_acc_per_class"]
    assert list(per_class) == classes
    assert all(0 <= accuracy <= 1 for accuracy in per_class.values()), per_class
    assert sum(per_class.values()) / len(classes) == pytest.approx(overall, abs=1e-6), per_class
    assert sum(accuracy > 0.1 for accuracy in per_class.values()) >= len(classes) / 2, per_class
    assert sum(per_class[name] for name in VEHICLES) / len(VEHICLES) > 0.2, per_class


@pytest.mark.slow
def test_train_and_kd_on_real_cifar10_jpegs(tmp_path):
    cifar_subset = extract_cifar_subset(tmp_path / "cifar10-subset")
    classes = sorted(p.name for p in (cifar_subset / "train").iterdir())
    assert len(classes) == 10 and all(len(list((cifar_subset / "test" / c).iterdir())) == TEST_PER_CLASS for c in classes)
    data = ["dataset=imagefolder", f"dataset.root={cifar_subset}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    recipe = ["teacher.kwargs.width=16", "epochs=4"]
    run_distill_in_process("train", *data, *recipe, cwd=tmp_path)
    run_distill_in_process("kd", *data, *recipe, "teacher_epochs=4", "student=mlp_small", cwd=tmp_path)
    (train_summary,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/*_train/summary.json")]
    (kd_summary,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/*_kd/summary.json")]
    teacher = train_summary["teacher"]
    assert train_summary["dataset"] == "imagefolder"
    # 10 balanced classes: chance is 10%; a few epochs on 1,800 real images do clearly better
    assert teacher["test_acc_best"] > 0.25
    assert_per_class_accuracies(teacher, teacher["test_acc_best"], classes)
    assert kd_summary["teacher"]["source"] == "cache"
    assert kd_summary["teacher"]["test_acc_per_class"] == teacher["test_acc_per_class"]  # the same teacher
    assert kd_summary["student"]["test_acc_best"] > 0.2
    assert_per_class_accuracies(kd_summary["student"], kd_summary["student"]["test_acc_best"], classes)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # decoded once, reused by kd
