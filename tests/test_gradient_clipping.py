"""`optimizer.clip_grad_norm`: every step clips the global L2 norm of the gradients (the network's and a method's parts)
before the optimizer steps (`training.compute.ClippingGradScaler`), in `distill train`, kd and a fused group; the
refusals; the recipe. A captured step with it (bf16, fp16 after the GradScaler unscales) is in tests/test_cuda.py."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import (
    CPU_DEVICE,
    dropout_train_config,
    fused_group,
    metrics_without_timing,
    read_jsonl,
    small_kd_config,
    small_train_config,
    train_stopped_mid_epoch,
)
from torch import nn

from distill_cli.core.config import KDConfig, ModelConfig, OptimizerConfig, TrainConfig
from distill_cli.core.errors import DistillError
from distill_cli.runs.fused import run_kd_fused
from distill_cli.runs.kd import run_kd
from distill_cli.runs.teacher_cache import teacher_recipe
from distill_cli.runs.train import run_train
from distill_cli.training.compute import ClippingGradScaler, resolve_compute

PLAIN_SGD = OptimizerConfig(momentum=0.0, weight_decay=0.0, schedule="constant")


def _stepped(clip: float | None, gradients: list[torch.Tensor], scaler=None) -> list[torch.Tensor]:
    """What one SGD step at lr 1 (no momentum, no decay) moves each of two parameters, given their gradients (times
    `scaler`'s loss scale, as a backward of its scaled loss leaves them)."""
    scaler = scaler or resolve_compute(CPU_DEVICE).grad_scaler(clip)
    parameters = [nn.Parameter(torch.zeros_like(g)) for g in gradients]
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = scaler.scale(gradient.clone())
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    scaler.step(optimizer)
    if clip is not None:  # what the epoch's metrics average: the norm before the clip, whether it acted
        assert {name: float(value) for name, value in scaler.report().items()} == pytest.approx({"grad_norm": 5.0, "grad_clipped": float(clip < 5)})
    return [-parameter.detach() for parameter in parameters]


def test_the_step_scales_every_gradient_by_one_factor_to_the_norm_and_leaves_a_smaller_norm_alone():
    gradients = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]  # global norm 5
    clipped = _stepped(1.0, gradients)
    assert math.sqrt(sum(float(g.square().sum()) for g in clipped)) == pytest.approx(1.0, rel=1e-5)
    for moved, gradient in zip(clipped, gradients):
        assert torch.allclose(moved, gradient / 5, rtol=1e-5)  # one factor for all: the direction is kept
    for moved, gradient in zip(_stepped(10.0, gradients), gradients):
        assert torch.equal(moved, gradient)
    for moved, gradient in zip(_stepped(None, gradients), gradients):
        assert torch.equal(moved, gradient)
    # fp16's loss scale (65536): the clip sees the gradients unscaled
    fp16 = ClippingGradScaler("cpu", enabled=True, clip_grad_norm=1.0)
    for moved, gradient in zip(_stepped(1.0, gradients, fp16), gradients):
        assert torch.allclose(moved, gradient / 5, rtol=1e-5)


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")]


def test_train_kd_and_a_fused_group_clip_their_steps(tmp_path, quiet_results):
    """A norm of 1e-4 at lr 0.05 moves a network by at most 5e-6 a step: its loss stays where it started (within 1%: augmented views vary it)
    where the same run unclipped falls (by 10-75% in 2 epochs); in `distill train`, kd's student and a fused group's job.
    The metrics say every step was clipped (`grad_clipped`), and of what norm (`grad_norm`)."""
    tight = replace(PLAIN_SGD, clip_grad_norm=1e-4)
    for name, optimizer in (("plain", PLAIN_SGD), ("clipped", tight)):
        run_train(small_train_config(tmp_path / name, optimizer=optimizer), tmp_path / name / "train")
        student = ModelConfig(arch="mlp", kwargs={"hidden": [64]})
        run_kd(small_kd_config(tmp_path / name, optimizer=optimizer, student=student, baseline=False), tmp_path / name / "kd")
    for run in ("train", "kd"):
        rows = read_jsonl(tmp_path / "clipped" / run / "metrics.jsonl")
        assert all(row["grad_clipped"] == 1.0 and row["grad_norm"] > 1e-3 for row in rows), rows
        assert "grad_norm" not in read_jsonl(tmp_path / "plain" / run / "metrics.jsonl")[0]
        plain, clipped = _losses(tmp_path / "plain" / run), _losses(tmp_path / "clipped" / run)
        assert clipped[-1] == pytest.approx(clipped[0], rel=0.01) and plain[-1] < plain[0] * 0.95, (run, plain, clipped)
    jobs = [replace(cfg, optimizer=tight if k == 0 else PLAIN_SGD) for k, cfg in enumerate(fused_group(tmp_path / "fused", ModelConfig(arch="mlp", kwargs={"hidden": [64]})))]
    run_kd_fused(jobs, [tmp_path / "fused" / f"job{k}" for k in range(len(jobs))])
    first, other = _losses(tmp_path / "fused" / "job0"), _losses(tmp_path / "fused" / "job1")
    assert first[-1] == pytest.approx(first[0], rel=0.01) and other[-1] < other[0] * 0.95, (first, other)


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: OptimizerConfig(clip_grad_norm=0.0), "must be > 0"),
        (lambda: OptimizerConfig(clip_grad_norm=float("inf")), "must be > 0"),
        (lambda: OptimizerConfig(name="dot", clip_grad_norm=1.0), "not with name=dot"),
        (lambda: KDConfig(peers=["mlp", "mlp"], optimizer=OptimizerConfig(clip_grad_norm=1.0)), "not with peers"),
    ],
)
def test_a_bad_clip_is_refused_naming_the_key(config, message):
    with pytest.raises(DistillError, match=rf"^optimizer\.clip_grad_norm: {message}"):
        config()


def test_the_clip_is_part_of_the_recipe_and_off_keeps_the_cached_keys():
    assert "clip_grad_norm" not in teacher_recipe(TrainConfig())["optimizer"]
    assert teacher_recipe(TrainConfig(optimizer=OptimizerConfig(clip_grad_norm=1.0)))["optimizer"]["clip_grad_norm"] == 1.0


def test_a_clipped_smoothed_run_stopped_mid_epoch_resumes_to_the_metrics_of_the_run_never_stopped(tmp_path, monkeypatch, quiet_results):
    """The epoch's `grad_norm` and `grad_clipped` sums are saved with its partial totals: the resumed epoch's means
    are the uninterrupted one's, exactly (as its losses, under label smoothing)."""
    cfg = dropout_train_config(tmp_path, label_smoothing=0.1, optimizer=replace(PLAIN_SGD, clip_grad_norm=0.5))
    run_train(cfg, tmp_path / "reference")
    train_stopped_mid_epoch(monkeypatch, cfg, tmp_path / "run")
    run_train(replace(cfg, resume=True), tmp_path / "run")
    rows = metrics_without_timing(tmp_path / "run")
    assert rows == metrics_without_timing(tmp_path / "reference")
    assert all(0 < row["grad_clipped"] < 1 for row in rows), rows  # some steps clipped, not all: the means are read
