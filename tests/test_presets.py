"""The paper presets (configs/experiment/) train, on small synthetic data; Hinton et al.'s MNIST setting at
T=20 trains its student; the baseline kd trains reports itself as the baseline; a kd run that fails keeps
the teacher and baseline results it obtained."""

import json
import math
from dataclasses import replace

import pytest
from conftest import (
    compose_config,
    on_training_step,
    run_distill_in_process,
    small_kd_config,
    small_train_config,
    table_rows,
)

from distill_cli.core.config import PublishedConfig, config_dir, experiment_presets, validate_config
from distill_cli.core.console import results_table
from distill_cli.runs.common import published_entry
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train

pytestmark = pytest.mark.usefixtures("quiet_results")

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
TEACHER_PRESETS = ["cifar100_resnet32x4", "cifar100_resnet50", "cifar100_resnet56", "cifar100_resnet110", "cifar100_vgg13", "cifar100_wrn_40_2", "mnist_hinton"]


def _synthetic(name: str, images: int = 0) -> list[str]:
    """Small synthetic data in the preset's dataset's channels: MNIST's 1 x 28 x 28; CIFAR's 3 channels at 16 x
    16 (every CIFAR net takes it; a quarter of 32 x 32's work). By default one step of the preset's batch
    (64 or 128) after the validation split."""
    if name.startswith("mnist"):
        shape, images = ["dataset.channels=1", "dataset.image_size=28"], images or 150
    else:
        shape, images = ["dataset.image_size=16"], images or 80
    return ["dataset=synthetic", *shape, f"dataset.train_size={images}", "dataset.test_size=16", "device=cpu"]


# presets whose recipe another preset trains below (their configs are composed, validated and checked to reuse
# their teacher in test_config.py; every zoo network trains in test_models.py): the CIFAR-10 recipe's resnets are
# the CIFAR-100 presets'; resnet110 -> resnet32 and wrn_40_2 -> wrn_40_1 are resnet56 -> resnet20's and
# wrn_40_2 -> wrn_16_2's at other depths or widths; the ShuffleNet and MobileNet pairs are their teachers' pairs
# with the student at lr 0.01 (the teacher's recipe, teacher_lr 0.05, is checked in test_config.py); resnet50's
# recipe is the other teachers' (its network: test_models.py), and resnet50 -> vgg8 is vgg13 -> vgg8's student under it; the ImageNet presets need an image tree (their crops
# are cut from files), and train on one in test_imagenet_style.py
TRAINED_BY_ANOTHER = {
    "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet34_resnet18",
    "cifar10_resnet20", "cifar10_resnet56", "cifar10_resnet56_resnet20", "cifar100_resnet110", "cifar100_resnet110_resnet32",
    "cifar100_wrn_40_2_wrn_40_1", "cifar100_resnet32x4_shufflenetv1", "cifar100_resnet32x4_shufflenetv2",
    "cifar100_wrn_40_2_shufflenetv1", "cifar100_vgg13_mobilenetv2", "cifar100_resnet50", "cifar100_resnet50_mobilenetv2",
    "cifar100_resnet50_vgg8",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in EXPERIMENTS if name not in TRAINED_BY_ANOTHER])
def test_every_experiment_preset_trains_an_epoch(name, tmp_path):
    """Each preset, as `distill train|kd experiment=<name>` composes it (networks, optimizer, schedule, batch,
    T and alpha), on small synthetic data for one epoch of one step (a kd preset: its teacher, the baseline
    and the student): it completes with finite accuracies."""
    command = "train" if name in TEACHER_PRESETS else "kd"
    overrides = [f"experiment={name}", *_synthetic(name), "epochs=1", f"teacher_cache={tmp_path / 'cache'}"]
    if command == "kd":
        overrides.append("teacher_epochs=1")
    cfg = validate_config(command, compose_config(command, overrides))
    summary = (run_train if command == "train" else run_kd)(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    trained = [summary["teacher"]] + ([summary["student"], summary["baseline"]] if command == "kd" else [])
    assert all(math.isfinite(entry.get("test_acc_best", entry.get("test_acc"))) for entry in trained)


def test_hintons_mnist_setting_trains_its_student_at_t20(tmp_path):
    """`distill kd experiment=mnist_hinton_student` on MNIST-shaped synthetic data, without jitter so that
    the teacher is sure of every image in 3 epochs (logits 38 apart): the student at T=20 trains, its KD
    term falling. With the preset's former lr 0.1 it diverged at step 11 of its first epoch (T^2 = 400
    times the soft-target term: steps 50x the cross-entropy's)."""
    overrides = [
        "experiment=mnist_hinton_student", *_synthetic("mnist", images=2000), "dataset.augment=false",
        "teacher_epochs=3", "epochs=2", "baseline=false", f"teacher_cache={tmp_path / 'cache'}",
    ]
    cfg = validate_config("kd", compose_config("kd", overrides))
    assert (cfg.T, cfg.alpha) == (20.0, 0.9)
    summary = run_kd(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["student"]["test_acc_best"] >= 0.9
    kd_term = [row["loss/kd"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(kd_term) == 2 and kd_term[1] < kd_term[0]


def test_the_baseline_kd_trains_is_labelled_the_baseline_in_its_table(tmp_path):
    baseline = run_train(small_train_config(tmp_path, epochs=1), tmp_path / "baseline", "baseline")
    assert baseline["role"] == "baseline"
    assert [row[0] for row in table_rows(results_table(baseline))] == ["baseline"]
    del baseline["role"]  # a train summary written before runs said what they trained
    assert [row[0] for row in table_rows(results_table(baseline))] == ["teacher"]


def test_a_failed_kd_keeps_the_teacher_and_baseline_it_trained_in_its_summary(tmp_path, monkeypatch):
    on_training_step(monkeypatch, 1, lambda parts: {key: value * math.nan for key, value in parts.items()}, factory="kd_step")
    run_dir = tmp_path / "kd"
    quick = ["teacher.kwargs.width=8", "epochs=1", "teacher_epochs=1", "student.kwargs.hidden=[8]", "device=cpu"]
    result = run_distill_in_process("kd", *quick, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "student epoch 1: training diverged" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("student epoch 1: training diverged")
    for part in ("teacher", "baseline"):
        accuracy = summary[part].get("test_acc", summary[part].get("test_acc_best"))
        assert summary[part]["source"] == "trained" and 0 < accuracy <= 1
    assert summary["dataset"] == "digits" and "student" not in summary


def _method_run(name: str, key: str, *overrides: str):
    """`distill kd experiment=<name>` with the method of the published key `key` (loss=, alpha > 0 for "_kd",
    optimizer=dot for "_dot")."""
    method = key.removesuffix("_dot").removesuffix("_kd")
    chosen = [f"loss={method}", *(["alpha=0.5"] if "_kd" in key else []), *(["optimizer=dot"] if key.endswith("_dot") else [])]
    return validate_config("kd", compose_config("kd", [f"experiment={name}", *chosen, *overrides]))


@pytest.mark.parametrize("name", [name for name, command in experiment_presets().items() if command == "kd"])
def test_each_published_number_of_a_kd_preset_is_set_beside_the_run_it_was_published_for(name):
    """Every method a kd preset publishes a number for is a method, and `distill kd experiment=<name> loss=<it>`
    is set beside that number, nothing of its recipe said to differ once the published settings are given (DKD's
    NCKD weight for some pairs: without it, the run is told); a run of other epochs is told so too."""
    preset = validate_config("kd", compose_config("kd", [f"experiment={name}"]))
    assert preset.published.kd or preset.published.student, name  # every kd preset publishes something
    for key, number in preset.published.kd.items():
        settings = preset.published.settings.get(key, {})
        entry = published_entry(_method_run(name, key, *(f"loss.{k}={v}" for k, v in settings.items())))
        assert (entry["method"], entry["kd"], entry["differs"]) == (key, number, []), key
        for setting, value in settings.items():
            assert published_entry(_method_run(name, key))["differs"] == [f"loss.{setting} 8.0 (published: {value})"]
    shorter = published_entry(validate_config("kd", compose_config("kd", [f"experiment={name}", "epochs=3"])))
    assert shorter["differs"] == ([] if preset.published.epochs is None else [f"epochs 3 (published: {preset.published.epochs})"])


def test_kd_presets_take_their_teachers_published_number_from_the_teachers_preset():
    """The kd presets build on their teacher's preset, and so do its published numbers: torchdistill's CIFAR-10
    resnet56 (93.57) teaches resnet20, whose own 91.92 is the student alone; CRD's resnet32x4 (79.42) teaches resnet8x4."""
    cifar10 = validate_config("kd", compose_config("kd", ["experiment=cifar10_resnet56_resnet20"])).published
    assert (cifar10.teacher, cifar10.student, cifar10.epochs, cifar10.kd, cifar10.dataset) == (93.57, 91.92, 182, {}, "imagefolder")
    resnet8x4 = validate_config("kd", compose_config("kd", ["experiment=cifar100_resnet32x4_resnet8x4"])).published
    assert (resnet8x4.teacher, resnet8x4.student, resnet8x4.kd["kd"], resnet8x4.epochs) == (79.42, 72.50, 73.33, 240)


def test_a_runs_summary_and_table_set_the_published_numbers_beside_its_own(tmp_path):
    """A kd run with published numbers: its summary carries them with what of the run differs, its table's caption
    sets each beside the run's own; a student trained alone (alpha=0) is set beside the published student alone."""
    published = PublishedConfig(source="a paper", dataset="cifar100", epochs=5, teacher=90.0, student=80.0, kd={"kd": 85.0, "dkd": 86.0}, settings={"dkd": {"nckd_weight": 2.0}})
    cfg = replace(small_kd_config(tmp_path), published=published)
    summary = run_kd(cfg, tmp_path / "kd")
    assert summary["published"] == {
        "source": "a paper", "epochs": 5, "teacher": 90.0, "student": 80.0, "method": "kd", "kd": 85.0,
        "differs": ["dataset digits (published: cifar100)", "epochs 2 (published: 5)"],
    }
    here = {role: f"{summary[role][key]:.2%}" for role, key in (("teacher", "test_acc"), ("student", "test_acc_best"), ("baseline", "test_acc_best"))}
    assert results_table(summary).caption.splitlines()[-1] == (
        f"published (a paper, 5 epochs): teacher 90.00% (here {here['teacher']}), student alone 80.00% (here {here['baseline']}), "
        f"kd 85.00% (here {here['student']}); this run: dataset digits (published: cifar100), epochs 2 (published: 5)"
    )
    cfg = replace(cfg, published=replace(published, dataset="digits"))
    alone = published_entry(replace(cfg, alpha=0.0, epochs=5))
    assert (alone["method"], alone["kd"], alone["differs"]) == (None, None, [])
    dkd = published_entry(replace(cfg, loss={"name": "dkd", "nckd_weight": 8.0}, alpha=0.0, epochs=5))
    assert (dkd["method"], dkd["kd"], dkd["differs"]) == ("dkd", 86.0, ["loss.nckd_weight 8.0 (published: 2.0)"])
    with_hinton = published_entry(replace(cfg, loss={"name": "dkd", "nckd_weight": 2.0}, epochs=5))  # alpha 0.5: DKD + KD
    assert (with_hinton["method"], with_hinton["kd"]) == ("dkd_kd", None)
