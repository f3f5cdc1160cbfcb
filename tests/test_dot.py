"""DOT, the distillation-oriented trainer (`optimizer=dot`, `training.optim.DistillationOrientedSGD`): its update
against the paper's rule written out by hand, SGD where only the task loss reaches, the kd loop's split of a
step's loss, resume and fused groups, and the settings it refuses."""

import json
import os
import signal
from dataclasses import replace

import pytest
import torch
from conftest import close_runs, compose_config, fused_group, on_training_step, same_runs
from torch import nn

from distill_cli.core.checkpoint import load_checkpoint
from distill_cli.core.config import ModelConfig, OptimizerConfig, validate_config
from distill_cli.core.errors import DistillError, Interrupted
from distill_cli.runs.fused import run_kd_fused
from distill_cli.runs.kd import run_kd
from distill_cli.runs.teacher_cache import recipe_key, teacher_recipe
from distill_cli.runs.teachers import baseline_training_config, teacher_training_config
from distill_cli.training.compute import Compute
from distill_cli.training.setup import prepare_run
from distill_cli.training.optim import (
    DistillationOrientedSGD,
    build_optimizer,
    build_scheduler,
    check_optimizer,
    loss_to_backpropagate,
    task_and_distillation,
)
from distill_cli.core.world import World

DOT = OptimizerConfig(name="dot", lr=0.1, momentum=0.9, nesterov=False, dot_delta=0.075, weight_decay=0.01, decay_all=True)
CPU = torch.device("cpu")


def _losses(a, b, c, x):
    """A task loss reaching a and b, a distillation loss reaching a and c (c: like a connector only kd trains)."""
    task = ((a * x).sum() + (b * x).sum() - 1) ** 2
    distillation = ((a * c).sum() - 2) ** 2 + (c**2).sum()
    return task, distillation


def test_the_update_is_the_papers_rule_written_out():
    """Task momentum m - delta and distillation momentum m + delta for a parameter both reach, plain m for one that
    only one reaches; weight decay with the task gradient (with the distillation one where only it reaches); the
    first step starts each buffer at its gradient; the learning rate as the schedule sets it."""
    torch.manual_seed(0)
    start = [torch.randn(3) for _ in range(3)]
    params = [nn.Parameter(p.clone()) for p in start]
    optimizer = DistillationOrientedSGD([{"params": params, "weight_decay": 0.01}], lr=0.1, momentum=0.9, delta=0.075)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    a, b, c = (p.clone() for p in start)
    buffers: dict = {}
    for step in range(4):
        x = torch.randn(3)
        lr = 0.1 * 0.5**step
        # by hand
        ga, gb, gc = ([p.clone().requires_grad_() for p in (a, b, c)])
        task, distillation = _losses(ga, gb, gc, x)
        task_grads = torch.autograd.grad(task, [ga, gb])
        distillation_grads = torch.autograd.grad(distillation, [ga, gc])
        rule = {  # name: (momentum, gradient)
            "a task": (0.825, task_grads[0] + 0.01 * a), "a distillation": (0.975, distillation_grads[0]),
            "b task": (0.9, task_grads[1] + 0.01 * b), "c distillation": (0.9, distillation_grads[1] + 0.01 * c),
        }
        for name, (momentum, gradient) in rule.items():
            buffers[name] = gradient if step == 0 else momentum * buffers[name] + gradient
        a = a - lr * (buffers["a task"] + buffers["a distillation"])
        b, c = b - lr * buffers["b task"], c - lr * buffers["c distillation"]
        # DOT
        optimizer.zero_grad(set_to_none=True)
        task, distillation = _losses(*params, x)
        optimizer.stash(distillation)
        task.backward()
        optimizer.step()
        schedule.step()
        for mine, expected in zip(params, (a, b, c)):
            torch.testing.assert_close(mine.detach(), expected, rtol=1e-6, atol=1e-7)


def test_with_the_task_loss_alone_it_is_sgd_with_the_plain_momentum():
    """A teacher or a student trained alone under optimizer=dot trains as SGD does (momentum 0.9, no nesterov)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    sgd = replace(DOT, name="sgd", impl="loop")
    optimizers = [build_optimizer(models[0], DOT, CPU), build_optimizer(models[1], sgd, CPU)]
    assert isinstance(optimizers[0], DistillationOrientedSGD) and not isinstance(optimizers[1], DistillationOrientedSGD)
    schedules = [build_scheduler(optimizer, replace(DOT, schedule="step", milestones=[0.5]), 4) for optimizer in optimizers]
    for _ in range(4):
        images, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
        for model, optimizer, schedule in zip(models, optimizers, schedules):
            optimizer.zero_grad(set_to_none=True)
            parts = {"loss": nn.functional.cross_entropy(model(images), labels)}
            loss_to_backpropagate(optimizer, parts, lambda loss: loss).backward()
            optimizer.step()
            schedule.step()
    for mine, sgds in zip(*(model.parameters() for model in models)):
        torch.testing.assert_close(mine, sgds, rtol=1e-6, atol=1e-7)


def test_a_steps_loss_splits_into_the_task_term_and_the_rest():
    ce, kd, hint = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    assert task_and_distillation({"loss": ce + kd + hint, "loss/ce": ce, "loss/kd": kd, "loss/hint": hint}) == (ce, kd + hint)
    assert task_and_distillation({"loss": kd, "loss/kd": kd}) == (None, kd)  # loss.ce_weight=0
    assert task_and_distillation({"loss": ce}) == (ce, None)  # a network trained alone
    peers = {"loss/peer1/ce": ce, "loss/peer1/kd": kd, "loss/peer2/ce": 2 * ce, "loss/peer2/kd": hint, "train_acc/peer1": ce}
    assert task_and_distillation({"loss": 3 * ce + kd + hint, **peers}) == (3 * ce, kd + hint)  # mutual learning


@pytest.fixture(scope="module")
def dot_runs(tmp_path_factory):
    """Two fitnet kd jobs under DOT (the hint regressor is reached by the distillation term alone), each run alone."""
    root = tmp_path_factory.mktemp("dot")
    cfgs = [
        replace(cfg, optimizer=replace(DOT, lr=0.05, weight_decay=5e-4), loss={"name": "fitnet", "weight": 10.0})
        for cfg in fused_group(root, ModelConfig(arch="cnn", kwargs={"width": 4, "blocks": 2}))[:2]
    ]
    folders = [root / "alone" / str(n) for n in range(len(cfgs))]
    for cfg, folder in zip(cfgs, folders):
        run_kd(cfg, folder)
    return cfgs, folders


def test_the_kd_loop_gives_dot_both_gradients(dot_runs):
    """The student's parameters carry both momentum buffers, which differ; the regressor only the distillation one."""
    cfgs, folders = dot_runs
    state = load_checkpoint(folders[0] / "last.pt")["training"]["optimizer"]["state"]
    assert json.loads((folders[0] / "summary.json").read_text())["status"] == "completed"
    both = [s for s in state.values() if {"momentum_buffer", "distillation_momentum_buffer"} <= s.keys()]
    distillation_only = [s for s in state.values() if s.keys() == {"distillation_momentum_buffer"}]
    assert both and distillation_only
    assert not any(torch.equal(s["momentum_buffer"], s["distillation_momentum_buffer"]) for s in both)


def test_dot_jobs_train_fused_as_alone(dot_runs, tmp_path):
    cfgs, folders = dot_runs
    fused = [tmp_path / str(n) for n in range(len(cfgs))]
    assert [s["status"] for s in run_kd_fused(cfgs, fused)] == ["completed"] * 2
    for mine, alone in zip(fused, folders):
        same_runs(mine, alone)


def test_dot_students_stacked_train_as_one_after_another(dot_runs, tmp_path):
    """Stacked students (one forward graph, one backward pass for all) each get their own two gradients."""
    cfgs = [replace(cfg, loss={"name": "kd"}) for cfg in dot_runs[0]]  # a logit method: students stack
    sequential, stacked = ([tmp_path / how / str(n) for n in range(len(cfgs))] for how in ("sequential", "stacked"))
    run_kd_fused(cfgs, sequential)
    run_kd_fused(cfgs, stacked, "stacked")
    for mine, theirs in zip(stacked, sequential):
        close_runs(mine, theirs)


def test_an_interrupted_dot_run_resumes_exactly(dot_runs, tmp_path, monkeypatch):
    """Both momentum buffers travel in last.pt: a run stopped in its second epoch and resumed ends as the whole run."""
    cfgs, folders = dot_runs

    def interrupt(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    on_training_step(monkeypatch, len(prepare_run(cfgs[0])[2].train) + 3, interrupt, factory="kd_step")
    with pytest.raises(Interrupted):
        run_kd(cfgs[0], tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    monkeypatch.undo()
    run_kd(replace(cfgs[0], resume=True), tmp_path)
    same_runs(tmp_path, folders[0])


def test_the_preset_composes_as_mdistillers_recipe():
    cfg = validate_config("kd", compose_config("kd", ["optimizer=dot"]))
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.dot_delta, cfg.optimizer.nesterov) == ("dot", 0.9, 0.075, False)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.decay_all) == (0.05, 5e-4, True)


def test_a_dot_run_takes_its_teacher_and_baseline_from_the_cache_the_sgd_runs_fill():
    """`distill kd experiment=... optimizer=dot` finds the resnet32x4 that `distill train experiment=...` trained
    (and the student alone of the SGD kd run): the networks trained alone train as under SGD."""
    preset = "experiment=cifar100_resnet32x4_resnet8x4"
    dot, sgd = (validate_config("kd", compose_config("kd", [preset, *extra])) for extra in (["optimizer=dot"], []))
    assert (dot.optimizer.name, sgd.optimizer.name) == ("dot", "sgd")
    for recipe_of in (teacher_training_config, baseline_training_config):
        assert recipe_key(teacher_recipe(recipe_of(dot))) == recipe_key(teacher_recipe(recipe_of(sgd)))


@pytest.mark.parametrize(
    "changes, key",
    [({"nesterov": True}, "optimizer.nesterov"), ({"dot_delta": 0.95}, "optimizer.dot_delta"), ({"dot_delta": -0.1}, "optimizer.dot_delta")],
)
def test_settings_dot_cannot_take_are_refused_naming_the_key(changes, key):
    with pytest.raises(DistillError, match=f"^{key}: "):
        replace(DOT, **changes)


@pytest.mark.parametrize(
    "compute, reason",
    [
        (Compute(torch.device("cuda"), "fp16"), "device.precision=fp16 is not supported"),
        (Compute(CPU, "fp32", world=World(size=2, joined=True)), "runs in one process"),
        (Compute(CPU, "fp32", compile=True), "device.compile=true is not supported"),
    ],
)
def test_fp16_several_processes_and_compile_are_refused_in_one_line(compute, reason):
    with pytest.raises(DistillError, match=f"^optimizer.name=dot: {reason}"):
        check_optimizer(DOT, compute)
    check_optimizer(replace(DOT, name="sgd"), compute)  # SGD takes both
