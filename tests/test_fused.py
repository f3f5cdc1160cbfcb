"""Fused kd jobs (distill_cli/runs/fused.py): students trained on shared batches give what each gives alone."""

import json
import logging
import os
import signal
from dataclasses import replace

import pytest
from conftest import (
    fused_group,
    metrics_without_timing,
    on_training_step,
    same_runs,
    small_kd_config,
)

import distill_cli.kd.wiring as wiring
from distill_cli.core.checkpoint import load_checkpoint
from distill_cli.core.config import ModelConfig
from distill_cli.core.errors import Interrupted
from distill_cli.kd.wiring import untrained_teacher
from distill_cli.runs import memory
from distill_cli.runs.fused import group_key, run_kd_fused
from distill_cli.runs.kd import run_kd
from distill_cli.training.loop import fit_together
from distill_cli.training.setup import prepare_run

pytestmark = pytest.mark.usefixtures("quiet_results")


def _jobs(root) -> list:
    """Three kd jobs of one fused group (`fused_group`) whose student has dropout (torch's RNG every step)."""
    return fused_group(root, ModelConfig(arch="mlp", kwargs={"hidden": [16], "dropout": 0.3}))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The jobs and their folders when each runs alone (`run_kd`)."""
    root = tmp_path_factory.mktemp("fused")
    cfgs = _jobs(root)
    folders = [root / "alone" / str(n) for n in range(len(cfgs))]
    for cfg, folder in zip(cfgs, folders):
        run_kd(cfg, folder)
    return cfgs, folders


def test_fused_students_train_exactly_as_alone_with_one_teacher_forward_per_batch(alone, tmp_path, monkeypatch):
    cfgs, alone_folders = alone
    assert len({group_key(cfg) for cfg in cfgs}) == 1
    teacher_runs = []
    build_objective = wiring.build_objective

    def counting_build_objective(*args):
        objective, student_forward, teacher_forward = build_objective(*args)
        return objective, student_forward, lambda images: teacher_runs.append(1) or teacher_forward(images)

    monkeypatch.setattr(wiring, "build_objective", counting_build_objective)
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    summaries = run_kd_fused(cfgs, folders)
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for fused, single in zip(folders, alone_folders):
        same_runs(fused, single)
    steps = len(metrics_without_timing(folders[0])) * len(prepare_run(cfgs[0])[2].train)
    # once per batch, not once per student; and once on the memory plan's probe batch, for all the students
    assert len(teacher_runs) == steps + 1


def test_a_diverged_student_fails_alone_and_the_others_finish(alone, tmp_path, monkeypatch):
    cfgs, alone_folders = alone
    # the second student's first step (after each student's probe step in the memory plan, runs/memory.py): its loss is NaN
    on_training_step(monkeypatch, len(cfgs) + 2, lambda parts: {**parts, "loss": parts["loss"] * float("nan")}, factory="kd_step")
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    summaries = run_kd_fused(cfgs, folders)
    assert [s["status"] for s in summaries] == ["completed", "failed", "completed"]
    assert summaries[1]["error"].startswith("student epoch 1: training diverged, loss NaN/Inf at step 1")
    assert json.loads((folders[1] / "summary.json").read_text())["error"] == summaries[1]["error"]
    assert not (folders[1] / "last.pt").exists()
    for n in (0, 2):
        same_runs(folders[n], alone_folders[n])


def test_only_jobs_with_the_same_data_and_teacher_fuse(tmp_path):
    cfg = small_kd_config(tmp_path)
    same = [replace(cfg, T=8.0, alpha=0.1), replace(cfg, loss={**cfg.loss, "name": "kd"})]
    assert {group_key(other) for other in same} == {group_key(cfg)}
    # the students' optimizers and label smoothing may differ where the teacher's recipe does not: its lr and
    # smoothing given apart, or its checkpoint
    fixed_lr = replace(cfg, teacher_lr=0.05)
    assert group_key(replace(fixed_lr, optimizer=replace(cfg.optimizer, lr=1.0))) == group_key(fixed_lr)
    fixed_smoothing = replace(cfg, teacher_label_smoothing=0.0)
    assert group_key(replace(fixed_smoothing, label_smoothing=0.1)) == group_key(fixed_smoothing)
    given = replace(cfg, teacher=replace(cfg.teacher, checkpoint="teacher.pt"))
    assert group_key(replace(given, optimizer=replace(cfg.optimizer, lr=1.0, clip_grad_norm=1.0))) == group_key(given)
    apart = [
        # kd trains each job's teacher with its optimizer: another lr or clip is another teacher (one a group shares
        # trained the other jobs' students against the first job's teacher's logits until 2026-12-04)
        replace(cfg, optimizer=replace(cfg.optimizer, lr=1.0)),
        replace(cfg, optimizer=replace(cfg.optimizer, clip_grad_norm=1.0)),
        replace(cfg, label_smoothing=0.1),
        replace(cfg, seed=1),
        replace(cfg, epochs=3),
        replace(cfg, teacher=replace(cfg.teacher, kwargs={"width": 4})),
        replace(cfg, dataset=replace(cfg.dataset, augment=True)),
        replace(cfg, loss={"name": "dkd"}),
    ]
    assert len({group_key(other) for other in [cfg, *apart]}) == len(apart) + 1
    assert group_key(replace(cfg, peers=["mlp", "cnn"])) is None  # the training modes run alone


def test_an_interrupted_fused_group_resumes_exactly_fused_or_job_by_job(alone, tmp_path, monkeypatch):
    cfgs, alone_folders = alone
    steps = len(prepare_run(cfgs[0])[2].train)

    def interrupt(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    # epoch 2, step 5, student 2, after each student's probe step in the memory plan (runs/memory.py)
    on_training_step(monkeypatch, len(cfgs) + (steps + 4) * len(cfgs) + 2, interrupt, factory="kd_step")
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    with pytest.raises(Interrupted):
        run_kd_fused(cfgs, folders)
    for folder in folders:  # every student saved the same position
        last = load_checkpoint(folder / "last.pt")
        assert last["epoch"] == 1 and last["training"]["partial"]["steps"] == 5
    monkeypatch.undo()
    resumed = [replace(cfg, resume=True) for cfg in cfgs]
    run_kd(resumed[0], folders[0])  # `distill resume` of one job folder: that job alone
    run_kd_fused(resumed[1:], folders[1:])  # the rest of the group, fused again
    for fused, single in zip(folders, alone_folders):
        same_runs(fused, single)


def test_a_group_over_its_memory_budget_trains_as_sub_groups_each_job_exactly_as_alone(alone, tmp_path, monkeypatch, caplog):
    cfgs, alone_folders = alone
    compute, data, loaders = prepare_run(cfgs[0])
    batch = memory.probe_batch(loaders, data, cfgs[0].batch_size)
    need = memory.training_bytes(cfgs[0], compute, data, batch, untrained_teacher(cfgs[0], compute, data)).total
    fused_sizes = []
    monkeypatch.setattr("distill_cli.runs.fused.fit_together", lambda trainings, *args: fused_sizes.append(len(trainings)) or fit_together(trainings, *args))
    folders = [tmp_path / str(n) for n in range(len(cfgs))]
    with caplog.at_level(logging.INFO, logger="distill"):
        summaries = run_kd_fused(cfgs, folders, memory_gb=2.5 * need / memory.GIB)  # two students fit, not three
    assert f"budget {memory.byte_size(2.5 * need)} on cpu: trained as 2 groups of 2 and 1" in caplog.text
    assert fused_sizes == [2, 1]
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for fused_run, single in zip(folders, alone_folders):
        same_runs(fused_run, single)
