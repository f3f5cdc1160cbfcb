"""Label smoothing (`label_smoothing`, kd's `teacher_label_smoothing`): the smoothed cross-entropy of every network
a run trains, the teacher's setting apart from the student's, the recipes they are cached under, the refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, small_kd_config

from distill_cli.core.config import KDConfig, ModelConfig, TrainConfig
from distill_cli.core.errors import DistillError
from distill_cli.data.loader import Batch
from distill_cli.kd.objective import objective_of
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd
from distill_cli.runs.teacher_cache import teacher_recipe
from distill_cli.runs.teachers import baseline_training_config, teacher_training_config
from distill_cli.training.loop import cross_entropy_step


def _smoothed_by_hand(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> float:
    """Mean over rows of -sum_c q_c log p_c, q = 1 - smoothing on the label + smoothing / C on every class."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        target = [smoothing / len(row) + (1 - smoothing) * (c == label) for c in range(len(row))]
        total -= sum(q * (v - log_norm) for q, v in zip(target, row))
    return total / len(labels)


def _entropy_of_the_target(smoothing: float, classes: int) -> float:
    """The least cross-entropy any prediction can have against the smoothed target: the target's entropy."""
    on_label, elsewhere = 1 - smoothing + smoothing / classes, smoothing / classes
    return -on_label * math.log(on_label) - (classes - 1) * elsewhere * math.log(elsewhere)


def test_the_cross_entropy_of_a_network_trained_alone_and_of_a_kd_student_is_smoothed():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    batch = Batch(images=student, labels=labels, index=torch.arange(6))
    parts, _ = cross_entropy_step(lambda images: images, 0.1)(batch, 1)
    assert parts["loss"].item() == pytest.approx(_smoothed_by_hand(student, labels, 0.1), rel=1e-5)

    def terms(smoothing: float) -> dict:
        return objective_of(KDConfig(alpha=0.5, T=4.0, label_smoothing=smoothing))(Outputs(student), Outputs(teacher), batch, epoch=1)

    smoothed, plain = terms(0.1), terms(0.0)
    assert smoothed["loss/ce"].item() == pytest.approx(0.5 * _smoothed_by_hand(student, labels, 0.1), rel=1e-5)
    assert plain["loss/ce"].item() == pytest.approx(0.5 * _smoothed_by_hand(student, labels, 0.0), rel=1e-5)
    assert smoothed["loss/kd"].item() == plain["loss/kd"].item()  # the Hinton term is not smoothed


def test_the_teacher_has_its_own_setting_and_every_smoothed_network_its_own_recipe():
    student_smoothed = KDConfig(label_smoothing=0.1, teacher_label_smoothing=0.0)
    assert teacher_training_config(student_smoothed).label_smoothing == 0.0
    assert baseline_training_config(student_smoothed).label_smoothing == 0.1
    # unset, the teacher is trained as the student is (as teacher_lr follows optimizer.lr)
    assert teacher_training_config(KDConfig(label_smoothing=0.1)).label_smoothing == 0.1
    teacher_smoothed = KDConfig(teacher_label_smoothing=0.1)
    assert (teacher_training_config(teacher_smoothed).label_smoothing, baseline_training_config(teacher_smoothed).label_smoothing) == (0.1, 0.0)
    # `distill train label_smoothing=0.1` is the teacher kd looks up with teacher_label_smoothing=0.1
    assert teacher_recipe(TrainConfig(label_smoothing=0.1)) == teacher_recipe(teacher_training_config(KDConfig(teacher_label_smoothing=0.1)))
    assert "label_smoothing" not in teacher_recipe(TrainConfig())  # the keys cached before it existed still match


@pytest.mark.parametrize(
    "config, key",
    [(lambda: TrainConfig(label_smoothing=1.0), "label_smoothing"), (lambda: KDConfig(label_smoothing=-0.1), "label_smoothing"),
     (lambda: KDConfig(teacher_label_smoothing=1.5), "teacher_label_smoothing")],
)
def test_a_smoothing_outside_0_to_1_is_refused_naming_the_key(config, key):
    with pytest.raises(DistillError, match=rf"^{key}: must be in \[0, 1\)"):
        config()


def test_a_kd_run_smooths_its_student_and_baseline_and_not_the_teacher_it_was_told_not_to(tmp_path, quiet_results):
    """No prediction's cross-entropy can fall below the smoothed target's entropy: every epoch of the smoothed
    networks stays above it, while the teacher trained on plain labels goes below it (as the same student and
    baseline do unsmoothed: from about 0.2 at their second epoch down to 0.13)."""
    smoothing = 0.2
    student = ModelConfig(arch="mlp", kwargs={"hidden": [64]})
    cfg = small_kd_config(tmp_path, epochs=4, teacher_epochs=4, student=student, label_smoothing=smoothing, teacher_label_smoothing=0.0)
    run_dir = tmp_path / "kd"
    summary = run_kd(cfg, run_dir)
    floor = _entropy_of_the_target(smoothing, classes=10)
    teacher_losses = [epoch["loss"] for epoch in read_jsonl(run_dir / "teacher" / "metrics.jsonl")]
    baseline_losses = [epoch["loss"] for epoch in read_jsonl(run_dir / "baseline" / "metrics.jsonl")]
    student_ce = [epoch["loss/ce"] for epoch in read_jsonl(run_dir / "metrics.jsonl")]
    assert min(teacher_losses) < floor
    assert min(baseline_losses) > floor
    assert min(student_ce) > (1 - cfg.alpha) * floor
    def recipe(role: str) -> dict:  # the cache's recipe.json beside the checkpoint the run used
        return json.loads((Path(summary[role]["checkpoint"]).parent / "recipe.json").read_text())

    assert recipe("baseline")["label_smoothing"] == smoothing
    assert "label_smoothing" not in recipe("teacher")
