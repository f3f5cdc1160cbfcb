"""CUDA graphs of the training step (`device.cuda_graphs`, `training.graphs`) as far as the CPU can check them:
the decision and the reason it logs, `true` refused before training, and the static-buffer step (the batch copied
into fixed buffers, gradients zeroed in place, a graph-safe optimizer whose learning rate is a tensor, a last
partial batch eagerly on its own tensors) run eagerly, equal to the plain step. Capture and replay themselves run
in tests/test_cuda.py, on a GPU.
"""

import logging
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    distill_in_process,
    metrics_without_timing,
    small_kd_config,
    small_train_config,
)
from torch import nn

from distill_cli.core.config import (
    DatasetConfig,
    ModelConfig,
    OptimizerConfig,
    TeacherConfig,
)
from distill_cli.core.errors import DistillError
from distill_cli.core.world import World
from distill_cli.data.loader import Batch
from distill_cli.kd.teachers import once_per_batch
from distill_cli.training import graphs, loop, setup
from distill_cli.training.compute import Compute
from distill_cli.training.loop import EpochTotals, graphed_steps, optimisation_step
from distill_cli.training.optim import build_optimizer, build_scheduler, keep_lr_kind

CPU = Compute(torch.device("cpu"), "fp32")
GPU = Compute(torch.device("cuda"), "bf16")  # a device object only: nothing runs on it
AUTO = OptimizerConfig()  # optimizer.impl=auto


@pytest.mark.parametrize(
    "compute, impl, reason",
    [
        (CPU, "auto", "no CUDA device (training on cpu)"),
        (replace(GPU, world=World(size=2, joined=True)), "auto", "several processes"),
        (replace(GPU, compile=True), "auto", "device.compile=true"),
        (GPU, "foreach", "optimizer.impl=foreach"),
        (GPU, "dot", "optimizer.name=dot"),
        (GPU, "auto", None),
        (GPU, "fused", None),
    ],
)
def test_why_a_step_is_not_captured(compute, impl, reason):
    optimizer = OptimizerConfig(name="dot", nesterov=False) if impl == "dot" else OptimizerConfig(impl=impl)
    found = graphs.why_not_captured(compute, optimizer)
    assert found == reason if reason is None else found.startswith(reason)


def test_auto_says_why_graphs_are_off_and_true_refuses(caplog):
    with caplog.at_level(logging.INFO, logger="distill"):
        assert graphs.use_graphs("auto", CPU, AUTO, "teacher") is False  # silent: graphs are CUDA's
        assert graphs.use_graphs("auto", replace(GPU, compile=True), AUTO, "student") is False
        assert graphs.use_graphs("false", CPU, AUTO, "teacher") is False
        assert graphs.use_graphs("auto", GPU, AUTO, "baseline") is True
    assert [r.getMessage() for r in caplog.records] == [
        "student: CUDA graphs off: device.compile=true (torch.compile runs its own graphs: use one or the other)",
        "baseline: CUDA graphs on (each step replayed from a graph captured once per epoch)",
    ]
    with pytest.raises(DistillError, match="device.cuda_graphs=true: the training step cannot be captured: device.compile=true"):
        graphs.use_graphs("true", replace(GPU, compile=True), AUTO, "student")


def test_cuda_graphs_true_on_the_cpu_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    """Refused as the run is set up, before the data is loaded."""
    monkeypatch.chdir(tmp_path)

    def no_data(cfg):
        raise RuntimeError("the data was loaded")

    monkeypatch.setattr(setup, "load_dataset", no_data)
    assert distill_in_process(monkeypatch, "train", "device=cpu", "device.cuda_graphs=true", "dataset=synthetic") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distill train: error: device.cuda_graphs=true: the training step cannot be captured: no CUDA device (training on cpu)"]
    assert not list(tmp_path.rglob("metrics.jsonl"))


def _batches(count: int, size: int, last: int) -> list[Batch]:
    """`count` batches of `size` random 1x8x8 images of 3 classes, then one of `last` (a partial batch)."""
    generator = torch.Generator().manual_seed(1)
    sizes = [size] * count + [last]
    return [
        Batch(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator), torch.arange(n))
        for n in sizes
    ]


def _learner(graph_safe: bool, teacher: nn.Module) -> SimpleNamespace:
    """A small conv net with BatchNorm and dropout (random draws every step) and a kd-like step whose frozen
    teacher runs once per batch (`kd.teachers.once_per_batch`, as for a fused group), with the run's SGD and
    step schedule (x0.1 after the first epoch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(256, 3))
    shared_teacher = once_per_batch(lambda images: teacher(images))

    def step(batch: Batch, epoch: int):
        logits = model(batch.images)
        soft = nn.functional.kl_div(logits.log_softmax(1), shared_teacher(batch.images).softmax(1), reduction="batchmean")
        loss = nn.functional.cross_entropy(logits, batch.labels) + epoch * soft
        return {"loss": loss, "loss/kd": soft}, logits

    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", milestones=[0.5])
    optimizer = build_optimizer(model, cfg, CPU.device, graph_safe=graph_safe)
    return SimpleNamespace(
        model=model, step=step, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, 2), scaler=CPU.grad_scaler(),
        compute=CPU, method=nn.Module(), totals=None,
    )


def test_the_static_buffer_step_trains_as_the_plain_step(tmp_path):
    """Two epochs of 4 full batches and a partial one: the static-buffer step (as a CUDA graph replays it, run
    eagerly), with its graph-safe optimizer, gives the plain step's weights and epoch totals."""
    torch.manual_seed(5)
    teacher = nn.Linear(64, 3).requires_grad_(False)

    def teacher_forward(images):
        return teacher(images.flatten(1))

    batches = _batches(4, 8, last=5)
    results = {}
    for how in ("plain", "static"):
        learner = _learner(graph_safe=how == "static", teacher=teacher_forward)
        graphed = graphed_steps([learner], "auto", capture=False) if how == "static" else None
        torch.manual_seed(7)  # the dropout masks
        read = []
        for epoch in (1, 2):
            learner.totals = EpochTotals(CPU.device)
            for batch in batches:
                if graphed is None:
                    optimisation_step(learner.model, learner.method, learner.step, batch, epoch, learner.optimizer, learner.scaler, CPU, learner.totals)
                else:
                    [(parts, logits)], on = graphed(batch, epoch)
                    learner.totals.add(parts, logits, on.labels)
            read.append(learner.totals.read(learner.model))
            learner.scheduler.step()
        assert float(learner.optimizer.param_groups[0]["lr"]) == pytest.approx(0.01)
        results[how] = read, learner.model.state_dict()
    (plain_read, plain_state), (static_read, static_state) = results["plain"], results["static"]
    for static, plain in zip(static_read, plain_read):  # epoch 2's tensor learning rate is 0.01 rounded to float32
        assert static["losses"] == pytest.approx(plain["losses"], rel=1e-6)
        assert {**static, "losses": None} == {**plain, "losses": None}
    for name, value in plain_state.items():
        torch.testing.assert_close(static_state[name], value, rtol=1e-6, atol=1e-7, msg=name)


class _RecordingBranches(graphs.Branches):
    """`graphs.Branches` on the CPU that records where each thing ran: `branch` is the branch now current."""

    def __init__(self, count: int, events: list):
        super().__init__(count, CPU.device)
        self.events, self.branch = events, 0

    @contextmanager
    def on(self, k: int):
        self.branch = k
        yield
        self.branch = 0

    def fork(self) -> None:
        self.events.append(("fork", self.branch))

    def join(self) -> None:
        self.events.append(("join", self.branch))


def test_a_groups_steps_on_branches_fork_after_the_teacher_and_train_as_one_pass(monkeypatch):
    """A fused group's steps on `graphs.Branches` (one CUDA stream each on a GPU): the teacher runs once, in the
    first student's forward on the current stream, before the other branches fork from it; each student's forward
    and optimizer step run on its own branch; the join comes last. The weights and totals are those of the group's
    steps in one pass (the dropout masks are drawn in the same order)."""
    torch.manual_seed(5)
    teacher = nn.Linear(64, 3).requires_grad_(False)
    events: list = []
    branches = _RecordingBranches(3, events)

    def teacher_forward(images):
        events.append(("teacher", branches.branch))
        return teacher(images.flatten(1))

    batches = _batches(3, 8, last=8)
    results = {}
    for how in ("one pass", "branches"):
        shared = once_per_batch(teacher_forward)
        learners = [_learner(graph_safe=True, teacher=shared) for _ in range(3)]
        for k, learner in enumerate(learners):
            step, update = learner.step, learner.optimizer.step

            def recorded_step(batch, epoch, k=k, step=step):
                events.append(("forward", k, branches.branch))
                return step(batch, epoch)

            def recorded_update(*args, k=k, update=update, **kwargs):
                events.append(("update", k, branches.branch))
                return update(*args, **kwargs)

            learner.step, learner.optimizer.step = recorded_step, recorded_update
        monkeypatch.setattr(loop, "Branches", lambda count, device: branches if count == 3 and device == CPU.device else None)
        graphed = graphed_steps(learners, "auto", capture=False, concurrent=how == "branches")
        torch.manual_seed(7)
        events.clear()
        for batch in batches:
            for learner in learners:
                learner.totals = EpochTotals(CPU.device)
            results_, on = graphed(batch, 1)
            for learner, (parts, logits) in zip(learners, results_):
                learner.totals.add(parts, logits, on.labels)
        results[how] = [(learner.totals.read(learner.model), learner.model.state_dict()) for learner in learners], list(events)
    (one_pass, _), (on_branches, events) = results["one pass"], results["branches"]
    for (read, state), (other_read, other_state) in zip(on_branches, one_pass):
        assert read == other_read
        for name, value in other_state.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    per_batch = len(events) // len(batches)
    assert events[:per_batch] == [
        ("forward", 0, 0), ("teacher", 0), ("fork", 0), ("update", 0, 0),
        ("forward", 1, 1), ("update", 1, 1), ("forward", 2, 2), ("update", 2, 2), ("join", 0),
    ]


@pytest.mark.parametrize("graph_safe", [True, False])
def test_a_resumed_optimizer_keeps_the_kind_of_learning_rate_it_was_built_with(graph_safe):
    """last.pt of a run with CUDA graphs holds a tensor learning rate, of one without a float: resumed the other way,
    the optimizer gets its own kind back (a float in a graph would stay at its value when the schedule moves)."""
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    saved = build_optimizer(nn.Linear(2, 2), cfg, CPU.device, graph_safe=not graph_safe).state_dict()
    optimizer = build_optimizer(nn.Linear(2, 2), cfg, CPU.device, graph_safe=graph_safe)
    optimizer.load_state_dict(saved)
    keep_lr_kind(optimizer, graph_safe, CPU.device)
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(lr, torch.Tensor) == graph_safe and float(lr) == pytest.approx(0.1) for lr in lrs)


def _force_graphs(monkeypatch) -> list[int]:
    """Every check passes on this CPU, so a run takes the graph path, whose steps then run eagerly on static buffers:
    the sizes of the groups of networks whose steps `graphs.GraphedStep` ran, one entry a step."""
    monkeypatch.setattr(graphs, "why_not_captured", lambda compute, impl: None)
    steps, call = [], graphs.GraphedStep.__call__

    def counted(self, batch, epoch):
        results, on = call(self, batch, epoch)
        steps.append(len(results))
        return results, on

    monkeypatch.setattr(graphs.GraphedStep, "__call__", counted)
    return steps


TINY_DATA = DatasetConfig(name="synthetic", num_classes=4, channels=3, image_size=12, train_size=320, test_size=64, augment=True)


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_results")
def test_a_teacher_and_a_fused_group_train_alike_through_the_graph_path(tmp_path, monkeypatch):
    """`distill train` (`fit`) and a fused group of 2 kd jobs (`fit_together`: one graph over the group's steps, the
    teacher run in every step, once per batch through the group's `Shared`) on the graph path give the eager runs'
    metrics on the CPU (to the float32 rounding of the graph-safe optimizer's tensor learning rate)."""
    from distill_cli.runs.fused import run_kd_fused
    from distill_cli.runs.train import run_train

    net = {"width": 4, "blocks": 1}
    kd = small_kd_config(tmp_path, dataset=TINY_DATA, teacher=TeacherConfig(arch="cnn", kwargs=net), student=ModelConfig(arch="cnn", kwargs=net), baseline=False)
    for setting in ("false", "auto"):
        with monkeypatch.context() as patched:
            steps = _force_graphs(patched) if setting == "auto" else []
            device = replace(kd.device, cuda_graphs=setting)
            run_train(small_train_config(tmp_path / setting, dataset=TINY_DATA, teacher=kd.teacher, device=device), tmp_path / setting / "train")
            job = replace(kd, device=device, teacher=replace(kd.teacher, checkpoint=str(tmp_path / setting / "train" / "best.pt")))
            run_kd_fused([job, replace(job, T=2.0)], [tmp_path / setting / f"job{k}" for k in range(2)])
            # 2 epochs of 4 steps (288 training images, batch 64): the teacher's, then the group's (2 students)
            assert steps == ([] if setting == "false" else [1] * 8 + [2] * 8)
    for run in ("train", "job0", "job1"):
        rows, reference = (metrics_without_timing(tmp_path / setting / run) for setting in ("auto", "false"))
        assert len(rows) == len(reference) == 2
        for row, other in zip(rows, reference):
            assert row == pytest.approx(other, rel=1e-4), run
