"""The methods with a stage before distillation, FT (Kim et al. 2018) and AB (Heo et al. 2019), against
independent computations of their papers' formulas (values and gradients, float64), the stage trained
through `distill kd` into <run>/pretrain, and its resume (FT's and SSKD's, whose terms are tested in
tests/test_methods_sskd.py): a stop inside the stage resumes there, a stop after it does not train it again."""

import json
import math
import os
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    comparable_results,
    metrics_without_timing,
    on_training_step,
    small_kd_config,
)
from test_methods_classic import (
    LABELS,
    batch_norm_train,
    check,
    conv1x1,
    randomise,
    same_size,
)
from test_methods_features import BATCH, outputs_of, set_up

import distill_cli.kd.wiring
from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import DatasetConfig, KDConfig, ModelConfig, TeacherConfig
from distill_cli.core.errors import DistillError, Interrupted
from distill_cli.data import load_dataset
from distill_cli.data.loader import Batch
from distill_cli.kd.wiring import wire_kd
from distill_cli.losses.base import build_method
from distill_cli.models import build_model
from distill_cli.runs.fused import group_key
from distill_cli.runs.kd import run_kd
from distill_cli.training.compute import Compute

CPU = Compute(torch.device("cpu"), "fp32", channels_last=None)
# last stages of different sizes: the teacher's 4x4 is pooled to the student's 2x2
FT_STUDENT = {"stage1": (3, 4, 4), "stage2": (5, 2, 2)}
FT_TEACHER = {"stage1": (2, 8, 8), "stage2": (4, 4, 4)}


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.1 * x)


def conv3x3(x: torch.Tensor, conv, transposed: bool = False) -> torch.Tensor:
    """A 3x3 (transposed) convolution, stride 1, padding 1, in float64 from the layer's weights."""
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    if transposed:  # a stride-1 transposed conv is the conv with the kernel flipped and in/out swapped
        weight = weight.flip(-1, -2).transpose(0, 1)
    return F.conv2d(x, weight, bias, padding=1)


def test_ft_is_the_mean_l1_distance_of_the_normalised_factors():
    """weight * mean |F_T/||F_T|| - F_S/||F_S|| |: the teacher's factor from the paraphraser's encoder (conv ->
    LeakyReLU, three times), the student's from the translator (conv -> BatchNorm -> LeakyReLU, three times)."""
    method = set_up({"name": "ft", "weight": 3.0}, FT_STUDENT, FT_TEACHER)
    randomise(method, 21)
    assert method.paraphraser.encoder[-2].out_channels == 2  # rate 0.5 of the teacher's 4 channels
    student, teacher = outputs_of(FT_STUDENT, seed=22, requires_grad=True), outputs_of(FT_TEACHER, seed=23)

    def expected(s_feats, t_feats):
        s = s_feats["stage2"]
        convs = [m for m in method.translator if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in method.translator if isinstance(m, torch.nn.BatchNorm2d)]
        for conv, norm in zip(convs, norms):
            s = leaky(batch_norm_train(conv3x3(s, conv), norm))
        t = t_feats["stage2"]
        for conv in (m for m in method.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)):
            t = leaky(conv3x3(t, conv))
        s, t = same_size(s, t)
        s_flat, t_flat = s.reshape(BATCH, -1), t.reshape(BATCH, -1)
        difference = t_flat / t_flat.norm(dim=1, keepdim=True) - s_flat / s_flat.norm(dim=1, keepdim=True)
        return 3.0 * difference.abs().mean()

    check(method, "ft", student, teacher, expected)


def test_ft_stage_is_the_paraphrasers_reconstruction_error_and_trains_it_alone():
    method = set_up({"name": "ft"}, FT_STUDENT, FT_TEACHER)
    randomise(method.paraphraser, 24)
    teacher = outputs_of(FT_TEACHER, seed=25)
    stage = method.stage()
    assert (stage.epochs, stage.lr, stage.trains_student) == (30, 0.01, False)
    t = teacher.features["stage2"].double()
    x = t
    for conv in (m for m in method.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)):
        x = leaky(conv3x3(x, conv))
    for conv in (m for m in method.paraphraser.decoder if isinstance(m, torch.nn.ConvTranspose2d)):
        x = leaky(conv3x3(x, conv, transposed=True))
    expected = ((x - t) ** 2).mean()
    assert stage.terms(None, teacher, LABELS, 1)["ft_reconstruction"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(p.requires_grad for p in method.paraphraser.parameters())  # frozen while distilling
    with stage.training():
        assert all(p.requires_grad for p in method.paraphraser.parameters())
    assert not any(p.requires_grad for p in method.paraphraser.parameters())


def test_ab_is_the_activation_boundary_distance_deeper_stages_weighing_more():
    """The paper's (s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0], summed over a stage, over the batch
    size, x 3/1000, each earlier stage half the next; a connector (1x1 conv + BN) where channels differ."""
    student_shapes = {"preact1": (3, 4, 4), "preact2": (4, 2, 2)}
    teacher_shapes = {"preact1": (3, 8, 8), "preact2": (6, 4, 4)}
    method = set_up({"name": "ab", "margin": 0.5}, student_shapes, teacher_shapes)
    randomise(method.connectors, 26)
    assert isinstance(method.connectors[0], torch.nn.Identity)  # equal channel counts: no connector
    student, teacher = outputs_of(student_shapes, seed=27, requires_grad=True), outputs_of(teacher_shapes, seed=28)
    stage = method.stage()
    assert (stage.epochs, stage.lr, stage.trains_student) == (30, None, True)

    def expected(s_feats, t_feats):
        total, m = 0.0, 0.5
        for index, point in enumerate(("preact1", "preact2")):
            s = s_feats[point]
            if index == 1:
                s = batch_norm_train(conv1x1(s, method.connectors[1][0]), method.connectors[1][1])
            s, t = same_size(s, t_feats[point])
            distance = (s + m) ** 2 * ((s > -m) & (t <= 0)) + (s - m) ** 2 * ((s <= m) & (t > 0))
            total = total + 2.0 ** (index - 1) * distance.sum() / BATCH / 1000 * 3
        return total

    check(stage.terms, "ab", student, teacher, expected)
    assert method(student, teacher, LABELS, 1) == {}  # distillation adds no AB term (RepDistiller's loss_kd = 0)


# each stage's term
STAGE_TERMS = {"ft": "ft_reconstruction", "ab": "ab", "sskd": "sskd_pretext"}


@pytest.mark.parametrize("method", STAGE_TERMS)
def test_the_stage_step_trains_its_parts_and_only_ab_the_student(method):
    """Through the wiring `distill kd` uses: the stage's gradients reach every part it trains, the student's
    feature layers for AB (not its classifier, which the term does not reach), nothing of the student for FT
    and SSKD (the teacher's projection head)."""
    data = load_dataset(DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=8, train_size=8, test_size=4, val_split=0.0))
    cfg = KDConfig(teacher=TeacherConfig("cnn", {"width": 4}), student=ModelConfig("cnn", {"width": 6}), loss={"name": method})
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, data.info, "teacher").eval().requires_grad_(False)
    wired = wire_kd(cfg, data, CPU, teacher, seed=0)
    batch = Batch(data.train.images.float() / 255, data.train.labels, torch.arange(8))
    with wired.stage.training():
        parts, _ = wired.stage_step(batch, 1)
        parts["loss"].backward()
    assert set(parts) == {"loss", f"loss/{STAGE_TERMS[method]}"}
    assert [name for name, p in wired.stage.parts.named_parameters() if p.grad is None] == []
    assert any(True for _ in wired.stage.parts.parameters())  # other widths: AB has connectors
    classifier = [m for m in wired.student.modules() if isinstance(m, torch.nn.Linear)][-1]
    reached = {p for p in wired.student.parameters() if p.grad is not None}
    expected = set(wired.student.parameters()) - set(classifier.parameters()) if method == "ab" else set()
    assert reached == expected


@pytest.mark.parametrize(
    "loss, key",
    [({"name": "ft", "rate": 0.0}, "loss.rate"), ({"name": "ft", "p": 3}, "loss.p"), ({"name": "ab", "margin": -1.0}, "loss.margin"),
     ({"name": "ab", "init_epochs": -1}, "loss.init_epochs")],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


TINY = DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=8, train_size=32, test_size=16, val_split=0.0)


def stage_config(tmp_path, method: str, cache: str) -> KDConfig:
    """Two kd epochs after a 2-epoch stage, cnn -> cnn on small synthetic data (2 steps an epoch)."""
    cfg = small_kd_config(tmp_path, loss={"name": method, "init_epochs": 2}, alpha=0.0, dataset=TINY, teacher_epochs=1, teacher_cache=cache)
    return replace(cfg, student=ModelConfig("cnn", {"width": 4, "blocks": 2}), batch_size=16, baseline=False)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("teacher_cache"))


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_stage_run(run_dir, summary: dict, stage_term: str, term: str | None, falls: bool = True) -> None:
    """<run>/pretrain has the stage's two epochs, its term finite and, with `falls`, falling; the run's own
    metrics.jsonl has the two kd epochs with the method's term `term` (None: none) and not the stage's."""
    stage_lines = lines_of(run_dir / "pretrain" / "metrics.jsonl")
    assert [line["epoch"] for line in stage_lines] == [1, 2] and all(math.isfinite(line[stage_term]) for line in stage_lines)
    assert not falls or stage_lines[-1][stage_term] < stage_lines[0][stage_term]  # the stage learns
    main = lines_of(run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in main] == [1, 2] and stage_term not in main[0]
    assert (f"loss/{term}" in main[0]) == (term is not None)
    assert summary["pretrain"]["epochs"] == 2 and summary["student"]["test_acc_best"] >= 0


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_results")
def test_distill_kd_trains_the_ab_stage_then_distils_with_cross_entropy_alone(tmp_path, teacher_cache):
    summary = run_kd(stage_config(tmp_path, "ab", teacher_cache), tmp_path / "run")
    check_stage_run(tmp_path / "run", summary, "loss/ab", None)
    assert summary["pretrain"]["lr"] == 0.05 and summary["pretrain"]["trains_student"]  # the run's optimizer.lr


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_results")
@pytest.mark.parametrize("method, term, part", [("ft", "ft", "paraphraser"), ("sskd", "sskd_ss", "teacher_head")])
def test_a_stop_in_the_stage_resumes_in_it_and_a_stop_after_it_does_not_train_it_again(
    tmp_path, monkeypatch, teacher_cache, method, term, part
):
    """FT (SSKD) through `distill kd`, the stage's `part` frozen while distilling: the paraphraser (the teacher's
    projection head). Then SIGINT at the stage's 3rd step (epoch 2, step 1 of 2); `resume=true` continues the stage
    and is stopped at the 3rd kd step; `resume=true` again trains no stage step and ends with the metrics (stage
    and kd), student and method state of the run that never stopped."""
    cfg = stage_config(tmp_path, method, teacher_cache)
    reference = run_kd(cfg, tmp_path / "reference")
    # SSKD's head barely moves in 4 steps on an untrained teacher's near-equal features (all similarities ~1):
    # that it learns is tested on the digits (tests/test_methods_sskd.py)
    check_stage_run(tmp_path / "reference", reference, f"loss/{STAGE_TERMS[method]}", term, falls=method != "sskd")
    staged, final = (load_checkpoint(folder / LAST)["training"]["method"] for folder in (tmp_path / "reference" / "pretrain", tmp_path / "reference"))
    frozen = [name for name in final if name.startswith(f"method.{part}.")]
    assert frozen and all(torch.equal(final[name], staged[name]) for name in frozen)

    def run(stop_at: str | None, config=cfg) -> tuple[dict | None, int]:
        """The run into tmp_path/run, stopped by SIGINT at the 3rd step of `stop_at`: its summary (None when
        stopped) and how many stage steps it trained."""
        stage_steps = []
        on_training_step(monkeypatch, 1, lambda parts: stage_steps.append(1) or parts, factory="stage_step", module=distill_cli.kd.wiring)
        if stop_at is not None:
            stop = lambda parts: os.kill(os.getpid(), signal.SIGINT) or parts
            on_training_step(monkeypatch, 3, stop, factory=stop_at, module=distill_cli.kd.wiring)
        try:
            if stop_at is None:
                return run_kd(config, tmp_path / "run"), len(stage_steps)
            with pytest.raises(Interrupted):
                run_kd(config, tmp_path / "run")
            return None, len(stage_steps)
        finally:
            monkeypatch.undo()

    assert run("stage_step")[1] == 1  # the first step counted (counters count steps, not calls)
    assert load_checkpoint(tmp_path / "run" / "pretrain" / LAST)["training"]["partial"]["steps"] == 1
    assert run("kd_step", replace(cfg, resume=True))[1] == 1  # the stage continued
    assert load_checkpoint(tmp_path / "run" / LAST)["training"]["partial"]["steps"] == 1
    resumed, stage_steps = run(None, replace(cfg, resume=True))
    assert stage_steps == 0  # a finished stage is loaded, not trained again
    for sub in ("pretrain", "."):
        assert metrics_without_timing(tmp_path / "run" / sub) == metrics_without_timing(tmp_path / "reference" / sub)
    assert comparable_results(resumed)["student"] == comparable_results(reference)["student"]
    states = [load_checkpoint(d / LAST)["training"]["method"] for d in (tmp_path / "reference", tmp_path / "run")]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_run_with_a_stage_is_not_fused_with_others(tmp_path):
    """The fused launcher trains students on shared batches from the first step: a run with a stage runs alone."""
    for method in STAGE_TERMS:
        assert group_key(stage_config(tmp_path, method, "cache")) is None
    assert group_key(replace(stage_config(tmp_path, "ft", "cache"), loss={"name": "fitnet"})) is not None
