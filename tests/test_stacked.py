"""Stacked students (distill_cli/training/stacked.py): a fused group's students of one architecture run as one
vmapped network; same training as one after another, up to float summation order."""

import copy
import logging
import os
import signal
from dataclasses import replace

import pytest
import torch
from conftest import (
    CPU_DEVICE,
    close_runs,
    fused_group,
    metrics_without_timing,
    on_training_step,
    small_kd_config,
)

import distill_cli.runs.fused as fused
import distill_cli.training.stacked as stacked
from distill_cli.core.checkpoint import load_checkpoint
from distill_cli.core.config import ModelConfig
from distill_cli.core.errors import Interrupted
from distill_cli.models import build_model
from distill_cli.runs.fused import run_kd_fused
from distill_cli.training.compute import resolve_compute
from distill_cli.training.setup import prepare_run

pytestmark = pytest.mark.usefixtures("quiet_results")

CNN = ModelConfig(arch="cnn", kwargs={"width": 4, "blocks": 2})  # BatchNorm: running statistics to carry


def _jobs(root) -> list:
    """Three kd jobs of one fused group (`fused_group`) with a stackable student: cnn, BatchNorm, no dropout."""
    return fused_group(root, CNN)


@pytest.fixture(scope="module")
def one_after_another(tmp_path_factory):
    """The jobs trained fused, one student after another (each exactly as alone)."""
    root = tmp_path_factory.mktemp("stacked")
    cfgs = _jobs(root)
    folders = [root / "sequential" / str(n) for n in range(len(cfgs))]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(fused, "print_results", lambda summary, per_class=False: None)
        assert [s["status"] for s in run_kd_fused(cfgs, folders, "sequential")] == ["completed"] * 3
    return cfgs, folders


@pytest.fixture(scope="module")
def stacked_run(one_after_another, tmp_path_factory):
    """The same jobs trained fused and stacked: their folders and what the group logged."""
    cfgs, _ = one_after_another
    folders = [tmp_path_factory.mktemp("stacked_run") / str(n) for n in range(len(cfgs))]
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger, level = logging.getLogger("distill"), logging.getLogger("distill").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(fused, "print_results", lambda summary, per_class=False: None)
            summaries = run_kd_fused(cfgs, folders, "stacked")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [s["status"] for s in summaries] == ["completed"] * 3
    return folders, records


def test_stacked_students_train_as_one_after_another(one_after_another, stacked_run):
    _, sequential = one_after_another
    folders, records = stacked_run
    assert "fused: 3 students train on shared batches, stacked (hydra.launcher.batching=stacked)" in records
    for mine, theirs in zip(folders, sequential):
        close_runs(mine, theirs)
    first = load_checkpoint(folders[0] / "last.pt")["state_dict"]
    assert not torch.equal(first["1.running_mean"], torch.zeros_like(first["1.running_mean"]))


def test_an_interrupted_stacked_group_resumes_exactly(one_after_another, stacked_run, tmp_path, monkeypatch):
    cfgs, _ = one_after_another
    steps = len(prepare_run(cfgs[0])[2].train)

    def interrupt(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    # epoch 2, step 5, after each student's probe step in the memory plan (runs/memory.py)
    on_training_step(monkeypatch, len(cfgs) + (steps + 4) * len(cfgs) + 2, interrupt, factory="kd_step")
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    with pytest.raises(Interrupted):
        run_kd_fused(cfgs, folders, "stacked")
    assert load_checkpoint(folders[0] / "last.pt")["training"]["partial"]["steps"] == 5
    monkeypatch.undo()
    run_kd_fused([replace(cfg, resume=True) for cfg in cfgs], folders, "stacked")
    for resumed, uninterrupted in zip(folders, stacked_run[0]):
        assert metrics_without_timing(resumed) == metrics_without_timing(uninterrupted)
        weights = [load_checkpoint(folder / "last.pt")["state_dict"] for folder in (resumed, uninterrupted)]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[1])


def test_a_diverged_stacked_student_fails_alone(one_after_another, tmp_path, monkeypatch):
    cfgs, sequential = one_after_another
    # the second student's first step (after each student's probe step in the memory plan, runs/memory.py): its loss is NaN
    on_training_step(monkeypatch, len(cfgs) + 2, lambda parts: {**parts, "loss": parts["loss"] * float("nan")}, factory="kd_step")
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    summaries = run_kd_fused(cfgs, folders, "stacked")
    assert [s["status"] for s in summaries] == ["completed", "failed", "completed"]
    assert "training diverged" in summaries[1]["error"]
    for n in (0, 2):
        close_runs(folders[n], sequential[n])


def test_auto_stacks_only_when_measured_faster(one_after_another, tmp_path, monkeypatch, caplog):
    cfgs, _ = one_after_another
    timings = {"sequential": 0.02, "stacked": 0.01}
    monkeypatch.setattr(stacked, "time_both", lambda students, images, compute: dict(timings))
    chosen = []
    fit_together = fused.fit_together
    monkeypatch.setattr(fused, "fit_together", lambda *args: chosen.append(args[3]) or fit_together(*args))
    with caplog.at_level(logging.INFO, logger="distill"):
        run_kd_fused(cfgs[:2], [tmp_path / "a0", tmp_path / "a1"], "auto")
        timings.update(stacked=0.03)
        run_kd_fused(cfgs[:2], [tmp_path / "b0", tmp_path / "b1"], "auto")
    assert isinstance(chosen[0], stacked.StackedStudents) and chosen[1] is None
    assert "stacked (measured per step on cpu: 20.0 ms one after another, 10.0 ms stacked)" in caplog.text
    assert "one after another (measured per step on cpu: 20.0 ms one after another, 30.0 ms stacked)" in caplog.text


@pytest.mark.parametrize("images_dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_the_stacked_pass_computes_in_fp32(tmp_path, images_dtype):
    """A bf16 run's stacked students (autocast does not reach vmap's batched kernels): each member's logits and
    BatchNorm statistics are those of its own forward in fp32, on the batch the loader gives (bf16 or fp32)."""
    info = prepare_run(small_kd_config(tmp_path))[1].info
    torch.manual_seed(0)
    students = [build_model(CNN, info, "student") for _ in range(2)]
    copies = [copy.deepcopy(student) for student in students]
    group = stacked.StackedStudents()
    forwards = [group.add(student) for student in students]
    images = torch.randn(8, info.channels, *info.image_size).to(images_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [forward(images).logits for forward in forwards]
    for mine, student, alone in zip(logits, students, copies):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, alone(images.float()), rtol=1e-5, atol=1e-5)
        for (name, buffer), theirs in zip(student.named_buffers(), alone.buffers()):
            torch.testing.assert_close(buffer, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_stacked_weights_have_the_default_strides_of_channels_last_students(tmp_path):
    """resnet8x4's 1x1 shortcut convolutions in channels_last: their stacked weights get the plain strides (stacked as
    they were, cuDNN took them for channels_last and the stacked pass failed on CUDA), and still carry gradients."""
    info = prepare_run(small_kd_config(tmp_path))[1].info
    resnet = ModelConfig(arch="resnet_cifar", kwargs={"depth": 8, "width": 4, "stem": 32})
    students = [build_model(resnet, info, "student").to(memory_format=torch.channels_last) for _ in range(2)]
    weights = stacked.stacked_weights(students)
    assert any(w.dim() == 5 and w.shape[-2:] == (1, 1) for w in weights.values())  # the 1x1 case is there
    for name, weight in weights.items():
        assert weight.stride() == torch.empty(weight.shape).stride(), name
        torch.testing.assert_close(weight[1], dict(students[1].named_parameters())[name], rtol=0, atol=0)
    sum(w.sum() for w in weights.values()).backward()
    assert all(p.grad is not None and bool((p.grad == 1).all()) for p in students[0].parameters())


def test_students_that_cannot_stack_run_one_after_another(tmp_path):
    compute = resolve_compute(CPU_DEVICE)
    info = prepare_run(small_kd_config(tmp_path))[1].info
    cnns = [build_model(CNN, info, "student") for _ in range(2)]
    with_dropout = [build_model(ModelConfig(arch="mlp", kwargs={"hidden": [4], "dropout": 0.1}), info, "student") for _ in range(2)]
    assert stacked.why_not_stacked(cnns, (), compute) is None
    assert stacked.why_not_stacked(cnns[:1], (), compute) == "one student"
    assert stacked.why_not_stacked(cnns, ("pooled",), compute) == "the method reads the student's features"
    assert "dropout" in stacked.why_not_stacked(with_dropout, (), compute)
    assert stacked.choose_batching("stacked", with_dropout, (), None, compute)[0] == "sequential"


def test_measured_timings_come_from_both_ways(tmp_path):
    compute = resolve_compute(CPU_DEVICE)
    info = prepare_run(small_kd_config(tmp_path))[1].info
    students = [build_model(CNN, info, "student") for _ in range(3)]
    before = [s.state_dict()["0.weight"].clone() for s in students]
    seconds = stacked.time_both(students, torch.randn(8, info.channels, *info.image_size), compute, steps=1)
    assert set(seconds) == {"sequential", "stacked"} and all(value > 0 for value in seconds.values())
    assert all(not torch.equal(b, s.state_dict()["0.weight"]) for b, s in zip(before, students))  # both trained them
