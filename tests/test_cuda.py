"""The CUDA-only paths: fp16 autocast with a GradScaler, bf16 autocast, the CUDA RNG state in resume, and the
training steps replayed from CUDA graphs (`device.cuda_graphs`) against eager ones.

Skipped without a GPU; on a machine with one they run as part of the suite (an H200 ran them on 2026-12-04, before
the clipped-step test was added: docs/speed.md).
"""

import copy
import math
from dataclasses import replace

import pytest
import torch
from conftest import (
    comparable_results,
    dropout_train_config,
    metrics_without_timing,
    read_jsonl,
    small_kd_config,
    small_train_config,
    train_stopped_mid_epoch,
)

from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import DeviceConfig, ModelConfig
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.models import build_model
from distill_cli.training import graphs, loop
from distill_cli.training.setup import prepare_run
from distill_cli.training.stacked import StackedStudents

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("quiet_results", "restore_determinism"),
]

PRECISIONS = ["fp16", "bf16"]


@pytest.fixture
def restore_determinism():
    """A run sets torch's global determinism switches (device.deterministic, cudnn.benchmark); put them back."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


def _cuda(precision: str, deterministic: bool = False, graphs: str = "false") -> DeviceConfig:
    """The GPU at `precision`; eager steps unless `graphs` says otherwise (the tests below compare the two)."""
    return DeviceConfig(type="cuda", precision=precision, deterministic=deterministic, cuda_graphs=graphs)


def _assert_trained_at(run_dir, precision: str, epochs: int = 2) -> None:
    """Every epoch's losses are finite, the weights stay float32 (autocast computes in half precision, it does
    not store in it), and last.pt holds the GradScaler's state: its loss scale with fp16, nothing with bf16."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    assert all(math.isfinite(row[name]) for row in rows for name in ("loss", "ce", "kd") if name in row), rows
    last = load_checkpoint(run_dir / LAST)
    assert all(v.dtype == torch.float32 for v in last["state_dict"].values() if v.is_floating_point())
    scaler = last["training"]["scaler"]
    if precision == "fp16":
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:
        assert scaler == {}  # a disabled GradScaler saves no state


@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_and_kd_run_on_cuda_at_half_precision(tmp_path, precision):
    train = run_train(small_train_config(tmp_path, device=_cuda(precision)), tmp_path / "train")
    kd_cfg = small_kd_config(tmp_path, device=_cuda(precision), student=ModelConfig(arch="mlp", kwargs={"hidden": [32]}))
    # augmented: the frozen teacher runs in every kd step (its logits cannot be cached)
    kd = run_kd(replace(kd_cfg, dataset=replace(kd_cfg.dataset, augment=True)), tmp_path / "kd")
    for summary in (train, kd):
        assert (summary["device"], summary["precision"], summary["pipeline"]) == ("cuda", precision, "device")
    assert kd["teacher"]["source"] == "trained" and not kd["teacher_logits_cached"]
    for run in ("train", "kd/teacher", "kd/baseline", "kd"):
        _assert_trained_at(tmp_path / run, precision)
    # they learn (10 classes: chance is 0.1; on the CPU in bf16 these reach 0.65-0.71 and 0.56-0.76)
    assert train["teacher"]["test_acc_best"] > 0.4 and kd["teacher"]["test_acc"] > 0.4
    assert kd["student"]["test_acc_best"] > 0.3 and kd["baseline"]["test_acc_best"] > 0.3


@pytest.mark.parametrize("precision", PRECISIONS)
def test_interrupted_cuda_run_resumes_like_the_uninterrupted_one(tmp_path, monkeypatch, precision):
    """Dropout draws from the CUDA generator and augmentation from the loader's CUDA generator: a resume
    that did not restore them (or the GradScaler) would train on different masks, views or scales."""
    cfg = dropout_train_config(tmp_path, device=_cuda(precision, deterministic=True))
    reference = run_train(cfg, tmp_path / "reference")
    train_stopped_mid_epoch(monkeypatch, cfg, tmp_path / "run")
    training = load_checkpoint(tmp_path / "run" / LAST)["training"]
    assert training["partial"]["steps"] == 5 and "cuda" in training["rng"]
    resumed = run_train(replace(cfg, resume=True), tmp_path / "run")
    # deterministic algorithms: equal up to float rounding, if CUDA leaves any difference at all
    rows, reference_rows = metrics_without_timing(tmp_path / "run"), metrics_without_timing(tmp_path / "reference")
    assert len(rows) == len(reference_rows) == 3
    for row, reference_row in zip(rows, reference_rows):
        assert row == pytest.approx(reference_row, rel=1e-4)
    assert _numbers(resumed) == pytest.approx(_numbers(reference), rel=1e-4)


def _numbers(summary: dict) -> dict:
    """The teacher's numeric results in a train summary (accuracies, best epoch)."""
    return {k: v for k, v in comparable_results(summary)["teacher"].items() if isinstance(v, (int, float))}


def _captures(monkeypatch) -> list[int]:
    """The epochs whose step `graphs.GraphedStep` captured successfully, from now on."""
    captured, capture = [], graphs.GraphedStep._capture

    def counted(self, epoch):
        done = capture(self, epoch)
        if done:
            captured.append(epoch)
        return done

    monkeypatch.setattr(graphs.GraphedStep, "_capture", counted)
    return captured


def _close_metrics(rows: list[dict], reference: list[dict]) -> None:
    """Per-epoch losses within 5% and accuracies within 3 points: bf16 rounding over a short run (the graph runs the
    same kernels as the eager step; what differs is the order of some reductions cuDNN picks)."""
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in reference]
    for row, other in zip(rows, reference):
        for name, value in row.items():
            if name.startswith("loss") or name in ("ce", "kd"):
                assert value == pytest.approx(other[name], rel=0.05), (name, row, other)
            elif name.endswith("acc") and value is not None:
                assert abs(value - other[name]) <= 0.03, (name, row, other)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_graphed_train_and_kd_steps_match_eager_ones(tmp_path, monkeypatch, precision):
    """`distill train` and `distill kd` (augmented: the teacher runs inside every captured kd step) with
    device.cuda_graphs=true give the metrics of the eager steps within bf16 tolerance; the step is captured
    once per epoch (the epoch may change the step), and with fp16 the GradScaler's scale and inf check are in it."""
    student = ModelConfig(arch="cnn", kwargs={"width": 4, "blocks": 1})
    runs = {}
    for setting in ("false", "true"):
        captured = _captures(monkeypatch)
        device = _cuda(precision, deterministic=True, graphs=setting)
        train_cfg = small_train_config(tmp_path / setting, device=device, epochs=3)
        run_train(train_cfg, tmp_path / setting / "train")
        kd_cfg = small_kd_config(tmp_path / setting, device=device, student=student, epochs=3, teacher_epochs=3, baseline=False)
        run_kd(replace(kd_cfg, dataset=replace(kd_cfg.dataset, augment=True)), tmp_path / setting / "kd")
        # each network trained (train's teacher, kd's teacher unless cached, the student) captured once per epoch
        assert captured == [] if setting == "false" else (sorted(set(captured)) == [1, 2, 3] and len(captured) % 3 == 0)
        runs[setting] = {run: metrics_without_timing(tmp_path / setting / run) for run in ("train", "kd")}
        for run in ("train", "kd"):
            _assert_trained_at(tmp_path / setting / run, precision, epochs=3)
        monkeypatch.undo()
    for run in ("train", "kd"):
        _close_metrics(runs["true"][run], runs["false"][run])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_clipped_steps_are_captured_and_match_eager_ones(tmp_path, monkeypatch, precision):
    """optimizer.clip_grad_norm inside a captured step (with fp16 after the GradScaler unscales, before the fused step
    takes the inf flag): captured once per epoch, and the metrics of the eager clipped steps within bf16 tolerance."""
    runs = {}
    for setting in ("false", "true"):
        captured = _captures(monkeypatch)
        cfg = small_train_config(tmp_path / setting, device=_cuda(precision, deterministic=True, graphs=setting), epochs=3)
        run_train(replace(cfg, optimizer=replace(cfg.optimizer, clip_grad_norm=0.5)), tmp_path / setting / "train")
        assert captured == ([] if setting == "false" else [1, 2, 3])
        runs[setting] = metrics_without_timing(tmp_path / setting / "train")
        _assert_trained_at(tmp_path / setting / "train", precision, epochs=3)
        monkeypatch.undo()
    _close_metrics(runs["true"], runs["false"])


def test_graphed_steps_of_a_fused_group_match_eager_ones(tmp_path, monkeypatch):
    """A fused group's kd steps captured as one graph (the teacher run once for them, each student's step a branch on
    its own CUDA stream) train each job as its eager steps do, within bf16 tolerance."""
    from conftest import fused_group

    from distill_cli.runs.fused import run_kd_fused

    cfgs = fused_group(tmp_path, ModelConfig(arch="cnn", kwargs={"width": 4, "blocks": 1}))
    results = {}
    for setting in ("false", "true"):
        captured = _captures(monkeypatch)
        branches = []
        monkeypatch.setattr(loop, "Branches", lambda *args: branches.append(graphs.Branches(*args)) or branches[-1])
        jobs = [replace(cfg, device=_cuda("bf16", deterministic=True, graphs=setting)) for cfg in cfgs]
        run_dirs = [tmp_path / setting / f"job{k}" for k in range(len(jobs))]
        run_kd_fused(jobs, run_dirs)
        assert len(captured) == (0 if setting == "false" else 2)  # one graph for the group, per epoch
        # each student's step on its own stream: the first on the current one, the others on side streams
        assert [len(made.streams) for made in branches] == ([] if setting == "false" else [len(jobs) - 1])
        results[setting] = [metrics_without_timing(run_dir) for run_dir in run_dirs]
        monkeypatch.undo()
    for rows, reference in zip(results["true"], results["false"]):
        _close_metrics(rows, reference)


def test_stacked_channels_last_students_run_on_cuda(tmp_path):
    """Stacked students in channels_last with 1x1 convolutions (resnet8x4's shortcuts), bf16 autocast: each member's
    logits are those of its own forward (TF32 tolerance) and backward reaches every member. It failed in vmap's batch
    norm ("NYI: querying is_contiguous inside of vmap") until the stacked weights got their plain strides."""
    info = prepare_run(small_kd_config(tmp_path))[1].info
    resnet = ModelConfig(arch="resnet_cifar", kwargs={"depth": 8, "width": 4, "stem": 32})
    torch.manual_seed(0)
    students = [build_model(resnet, info, "student").cuda().to(memory_format=torch.channels_last) for _ in range(2)]
    copies = [copy.deepcopy(student) for student in students]
    group = StackedStudents()
    forwards = [group.add(student) for student in students]
    images = torch.randn(16, info.channels, *info.image_size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = [forward(images).logits for forward in forwards]
    torch.autograd.backward([value.square().mean() for value in logits])
    for mine, student, alone in zip(logits, students, copies):
        torch.testing.assert_close(mine, alone(images), rtol=2e-2, atol=2e-2)
        assert all(parameter.grad is not None for parameter in student.parameters())
