"""The memory budget of a fused group (`runs.fused.run_kd_fused`): what each student needs to train, measured
on its real networks, against the memory the device has left; a group that would not fit trains as
consecutive sub-groups, each fused, sharing the data, the teacher and its cached logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.config import KDConfig, OptimizerConfig
from ..core.console import log
from ..core.errors import DistillError
from ..data import DataSplits
from ..data.loader import Batch
from ..kd.objective import needs_teacher
from ..kd.teachers import Shared
from ..kd.wiring import student_shaped, untrained_teacher, wire_kd
from ..training.compute import Compute
from ..training.device_memory import GIB, available_bytes, byte_size
from ..training.setup import Loaders

SAFETY = 0.85  # of the free memory: room for the allocator's fragmentation, evaluation and checkpointing


PROBE_IMAGES = 16  # the training images a student's step is measured on (then scaled to the batch size)


# the optimizer's state tensors per parameter (each the parameter's size)
OPTIMIZER_STATES = {
    "sgd": lambda cfg: 1 if cfg.momentum > 0 else 0,  # the momentum buffer
    "adam": lambda cfg: 2,  # first and second moments
    "adamw": lambda cfg: 2,
    "dot": lambda cfg: 3,  # the task and distillation momentum buffers, and the distillation gradient of a step
}


@dataclass
class Need:
    """The bytes one student's training holds on the device."""

    weights: int  # the student's and the method's parameters and buffers
    gradients: int
    optimizer: int  # the optimizer's state
    activations: int  # what a training step keeps for backward, at the run's batch size

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


NOTHING = Need(0, 0, 0, 0)  # a job that fails before it trains


def checked_budget(memory_gb) -> float | None:
    """`hydra.launcher.memory_gb` as set: a positive number of GiB, or None (automatic); anything else
    is refused naming the key."""
    if memory_gb is None:
        return None
    number = isinstance(memory_gb, (int, float)) and not isinstance(memory_gb, bool)
    if not number or not math.isfinite(memory_gb) or memory_gb <= 0:
        raise DistillError(
            f"hydra.launcher.memory_gb: {memory_gb!r} is not a positive number of GiB (or null: the free memory, measured)"
        )
    return float(memory_gb)


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def autograd_saved_bytes(step, batch: Batch, compute: Compute, kept: nn.Module) -> int:
    """Bytes of the tensors autograd saves for backward in `step(batch, epoch 1)` (under the run's autocast),
    each storage once, without `kept`'s parameters and buffers (they are there anyway)."""
    present = {tensor.untyped_storage().data_ptr() for tensor in [*kept.parameters(), *kept.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in present:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), compute.autocast():
        step(batch, 1)
    return sum(storages.values())


def training_bytes(
    cfg: KDConfig, compute: Compute, data: DataSplits, batch: Batch, teacher: nn.Module | None, shared: Shared | None = None
) -> Need:
    """What `cfg`'s student needs to train, measured on the networks the run builds (on `teacher`, any network
    of the teacher's architecture, when the objective reads one): weights, gradients and optimizer state of the
    student and the method's trainable parts, and the activations its kd step saves for backward on the
    training images `batch`, scaled to `cfg.batch_size` (the teacher runs once for all the students of `shared`, as in
    the fused group). Nothing is trained, no global state is kept."""
    compute = replace(compute, compile=False)  # the same step, without compiling it
    # the student's shape is what costs memory: `student.init=teacher` is not copied (with alpha=0 the
    # objective reads no teacher, so there is none here to copy from)
    wired = wire_kd(cfg, data, compute, teacher, shared=shared, student=student_shaped(cfg.student, data, compute))
    trained = wired.trained
    activations = autograd_saved_bytes(wired.step, batch, compute, trained) * cfg.batch_size / len(batch.labels)
    parameters = tensor_bytes(p for p in trained.parameters() if p.requires_grad)
    return Need(
        weights=tensor_bytes([*trained.parameters(), *trained.buffers()]),
        gradients=parameters,
        optimizer=parameters * optimizer_states(cfg.optimizer),
        activations=round(activations),
    )


def optimizer_states(cfg: OptimizerConfig) -> int:
    """State tensors the optimizer keeps per parameter."""
    return OPTIMIZER_STATES[cfg.name](cfg)


def probe_batch(loaders: Loaders, data: DataSplits, batch_size: int) -> Batch:
    """The first training images (unaugmented, as the run's loaders normalise them), at most `PROBE_IMAGES`
    and the batch size, to measure a step on."""
    batch = next(iter(loaders.eval_loader(data.train)))
    count = min(PROBE_IMAGES, batch_size, len(batch.labels))
    # its own storage: saved views count as theirs
    return Batch(*(None if part is None else part[:count].clone() for part in batch))


def sub_groups(needs: list[int], budget: float) -> list[list[int]]:
    """The fewest consecutive sub-groups of near-equal size (sizes differ by at most one) whose needs each
    fit `budget`, as lists of positions; one job each when even one alone does not fit."""
    for count in range(1, len(needs) + 1):
        groups = _consecutive(len(needs), count)
        if all(sum(needs[position] for position in group) <= budget for group in groups):
            return groups
    return _consecutive(len(needs), len(needs))


def _consecutive(size: int, count: int) -> list[list[int]]:
    """`range(size)` cut into `count` consecutive parts, the first `size % count` one longer."""
    lengths = [size // count + (part < size % count) for part in range(count)]
    starts = [sum(lengths[:part]) for part in range(count)]
    return [list(range(start, start + length)) for start, length in zip(starts, lengths)]


def plan_fused(cfgs: list[KDConfig], compute: Compute, data: DataSplits, loaders: Loaders, memory_gb: float | None) -> list[list[int]]:
    """The sub-groups (positions in `cfgs`) a fused group trains as, one after another, to fit `memory_gb` GiB
    (None: `SAFETY` x the memory available once the data and a teacher are on the device); logs the estimate
    and the split in one line. A job whose config fails to build needs nothing here (it fails on its own
    when the group prepares it)."""
    batch = probe_batch(loaders, data, cfgs[0].batch_size)
    probes = Shared()  # one probe teacher, run once on the probe batch, for all the students
    needs = []
    for cfg in cfgs:
        try:
            teacher = probes.once("teacher", lambda: untrained_teacher(cfg, compute, data)) if needs_teacher(cfg) else None
            needs.append(training_bytes(cfg, compute, data, batch, teacher, probes))
        except DistillError:
            needs.append(NOTHING)
    budget = GIB * memory_gb if memory_gb is not None else SAFETY * available_bytes(compute.device)
    groups = sub_groups([need.total for need in needs], budget)
    log.info(describe_plan([need.total for need in needs], budget, compute.device, cfgs[0].batch_size, groups))
    return groups


def describe_plan(needs: list[int], budget: float, device: torch.device, batch_size: int, groups: list[list[int]]) -> str:
    """The log line of `plan_fused`."""
    measured = [need for need in needs if need] or [0]
    each = byte_size(measured[0]) if min(measured) == max(measured) else f"{byte_size(min(measured))} to {byte_size(max(measured))}"
    lengths = [len(group) for group in groups]
    if len(groups) == 1:
        outcome = "trained together"
    elif max(needs) > budget:
        outcome = "one student alone does not fit: trained one at a time"
    elif len(set(lengths)) == 1:
        outcome = f"trained as {len(groups)} groups of {lengths[0]}"
    else:
        outcome = f"trained as {len(groups)} groups of {', '.join(map(str, lengths[:-1]))} and {lengths[-1]}"
    return (
        f"fused: {len(needs)} students need ~{byte_size(sum(needs))} ({each} each: weights, gradients, optimizer state, "
        f"activations of a batch of {batch_size}), budget {byte_size(budget)} on {device}: {outcome}"
    )
