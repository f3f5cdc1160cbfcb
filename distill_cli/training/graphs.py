"""CUDA graphs of a training step (`device.cuda_graphs`): the whole optimisation step (the teacher's forward or
its stored logits looked up, the student's forward and backward, the loss, the fused optimizer's step and the
GradScaler's update) captured once per epoch and replayed for every batch, so that a step costs one launch
instead of hundreds (at batch 64 a resnet step on a GPU is bound by kernel launches, see docs/speed.md).

The recipe is torch's whole-network capture (torch.cuda.graphs): static input buffers that every batch is copied
into, a few eager warm-up steps on a side stream, the gradients set to None before capture so that backward
makes them in the graph's memory, autocast without its weight cache, and an optimizer whose learning rate is a
tensor on the device (a schedule's change then reaches the replayed step) and whose step needs no host sync
(`training.optim.build_optimizer(graph_safe=True)`: the fused kernel, which also takes the GradScaler's scale and
inf check as tensors). The graph is captured again when the epoch changes, since a step may read the epoch
(DKD's warm-up, CTKD's curriculum). A batch of another shape (a last partial batch) runs eagerly on its own
tensors, into the same gradient buffers.

Random numbers: the batch's augmentation is drawn eagerly by the loader, from its own seeded generator (whose
state last.pt saves, so a resumed run draws the same batches), before the batch is copied in; inside the graph
only torch's default CUDA generator is used (dropout, CRD's negatives), which torch registers with every capture
so that each replay draws new numbers. A step that draws from another generator is not graph-safe.

`GraphedStep` is the one place both the train step and the kd step (and a fused group's steps) are captured;
the loop hands it the step to run (`training.loop`). A fused group's students take `Branches`: each student's step
on its own CUDA stream, so that the captured graph holds them as parallel branches the GPU runs concurrently
(with graphs each step is one launch already; one after another, K small students still leave a GPU mostly idle).
On the CPU it runs the same static-buffer step eagerly, which the tests compare with the plain step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Generic, TypeVar

import torch

from ..core.config import OptimizerConfig
from ..core.errors import DistillError
from ..data.loader import Batch
from .compute import Compute

log = logging.getLogger("distill")

WARMUP_STEPS = 3  # eager steps on a side stream before the first capture (cuDNN's autotuning, lazy optimizer state)
Results = TypeVar("Results")


def why_not_captured(compute: Compute, optimizer: OptimizerConfig) -> str | None:
    """Why this run's training step cannot be replayed from a CUDA graph (None: it can), before anything is built."""
    if compute.device.type != "cuda":
        return f"no CUDA device (training on {compute.device.type})"
    if compute.world.distributed:
        return "several processes (DistributedDataParallel reduces gradients from hooks outside the graph)"
    if compute.compile:
        return "device.compile=true (torch.compile runs its own graphs: use one or the other)"
    if optimizer.name == "dot":
        return "optimizer.name=dot (its step is not the fused kernel the graph needs)"
    if optimizer.impl not in ("auto", "fused"):
        return f"optimizer.impl={optimizer.impl} (the graph needs the fused optimizer step, which makes no host sync)"
    return None


def not_capturable(reason: str) -> DistillError:
    """The one-line refusal of `device.cuda_graphs=true` where the step cannot be captured, for `reason`."""
    return DistillError(f"device.cuda_graphs=true: the training step cannot be captured: {reason}")


def checked_setting(setting: str, compute: Compute, optimizer: OptimizerConfig) -> str | None:
    """`why_not_captured`, refused (`not_capturable`) where `device.cuda_graphs=setting` is "true"."""
    reason = why_not_captured(compute, optimizer)
    if setting == "true" and reason is not None:
        raise not_capturable(reason)
    return reason


def use_graphs(setting: str, compute: Compute, optimizer: OptimizerConfig, label: str) -> bool:
    """Whether `label`'s training replays its steps from CUDA graphs (`device.cuda_graphs=setting`); `auto` logs why
    not when it cannot on a CUDA device (silent elsewhere: graphs are CUDA's), `true` refuses to train
    (DistillError) when it cannot."""
    if setting == "false":
        return False
    reason = checked_setting(setting, compute, optimizer)
    if reason is None:
        log.info(f"{label}: CUDA graphs on (each step replayed from a graph captured once per epoch)")
        return True
    if compute.device.type == "cuda":
        log.info(f"{label}: CUDA graphs off: {reason}")
    return False


def _copy_of(batch: Batch) -> Batch:
    return Batch(*(None if value is None else value.clone() for value in batch))


def _same_shapes(static: Batch, batch: Batch) -> bool:
    return all((a is None) == (b is None) and (a is None or a.shape == b.shape) for a, b in zip(static, batch))


def _fresh_views(static: Batch) -> Batch:
    """The static buffers as new tensor objects: steps that share work per batch by tensor identity (the teacher
    run once for a fused group's students, stacked students) see each copied-in batch as a new one."""
    return Batch(*(None if value is None else value.view_as(value) for value in static))


class Branches:
    """The steps of a group, `count` of them, each on its own CUDA stream: `on(0)` is the current stream, where the
    first step's forward runs the teacher (shared by the others through `kd.teachers.once_per_batch`); `fork()`,
    called once that forward has run, starts every other stream from there; `join()` makes the current stream wait
    for them all. Inside a capture the streams become parallel branches of the one graph. Each step allocates on its
    own stream and reads only the batch and the teacher's outputs from the current one, which live until after the
    join, so no memory is reused under another stream's feet. On the CPU (or for one step) every branch is the
    current stream and the steps run one after another."""

    def __init__(self, count: int, device: torch.device):
        self.streams = [torch.cuda.Stream(device) for _ in range(count - 1)] if device.type == "cuda" and count > 1 else []

    def on(self, k: int):
        """The context step `k` runs in."""
        return torch.cuda.stream(self.streams[k - 1]) if k > 0 and self.streams else nullcontext()

    def fork(self) -> None:
        for stream in self.streams:
            stream.wait_stream(torch.cuda.current_stream())

    def join(self) -> None:
        for stream in self.streams:
            torch.cuda.current_stream().wait_stream(stream)


class GraphedStep(Generic[Results]):
    """`optimise(batch, epoch) -> results` (one whole optimisation step of one or several networks: forward,
    backward, optimizer and GradScaler steps, gradients zeroed in place, not set to None, autocast without its
    cache) replayed from a CUDA graph on static copies of the batches.

    `optimizers`: every optimizer the step updates (their gradients are set to None before a capture). `capture`:
    whether to capture at all (False: the same static-buffer step run eagerly, as on the CPU). A capture that
    fails turns capturing off with a log line saying why, or, `required`, raises DistillError. Calling it with a
    batch returns the step's results and the batch they were computed on (the static buffers, or the batch itself
    when its shapes differ from the first batch's and it ran eagerly)."""

    def __init__(
        self, optimise: Callable[[Batch, int], Results], optimizers: list, capture: bool, required: bool = False,
        warmup_steps: int = WARMUP_STEPS,
    ):
        self.optimise, self.optimizers, self.capture, self.warmup_steps = optimise, optimizers, capture, warmup_steps
        self.required = required
        self.static: Batch | None = None
        self.graph = None  # torch.cuda.CUDAGraph of the epoch `self.epoch`
        self.epoch: int | None = None
        self.results: Results | None = None  # what the graph's replay writes into
        self.eager_steps = 0

    def __call__(self, batch: Batch, epoch: int) -> tuple[Results, Batch]:
        if self.static is None:
            self.static = _copy_of(batch)
        elif not _same_shapes(self.static, batch):  # a last partial batch: eagerly, on its own tensors
            return self.optimise(batch, epoch), batch
        else:
            for buffer, value in zip(self.static, batch):
                if buffer is not None:
                    buffer.copy_(value, non_blocking=True)
        if not self.capture:
            return self.optimise(_fresh_views(self.static), epoch), self.static
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            return self._on_side_stream(epoch), self.static
        if (self.graph is None or self.epoch != epoch) and not self._capture(epoch):
            return self.optimise(_fresh_views(self.static), epoch), self.static
        self.graph.replay()
        return self.results, self.static

    def _on_side_stream(self, epoch: int) -> Results:
        """An eager step on a side stream (as torch's recipe warms up before capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            results = self.optimise(_fresh_views(self.static), epoch)
        torch.cuda.current_stream().wait_stream(side)
        return results

    def _capture(self, epoch: int) -> bool:
        """Capture the step of `epoch` (nothing runs); False when the capture failed and capturing is now off."""
        self.graph = self.results = None  # the last epoch's graph and its memory go first
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)  # backward makes the gradients in the graph's memory
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.results = self.optimise(_fresh_views(self.static), epoch)
        except RuntimeError as error:  # a host sync, a shape computed from values, another generator
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if self.required:
                raise not_capturable(reason) from None
            log.warning(f"CUDA graphs off: capturing the training step failed ({reason}); it runs eagerly")
            self.capture, self.results = False, None
            return False
        self.graph, self.epoch = graph, epoch
        return True
