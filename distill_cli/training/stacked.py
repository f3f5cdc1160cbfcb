"""Students of one architecture run as one network: their weights stacked along a new first axis and the
module's forward mapped over it (`torch.func.stack_module_state`-style stacking + `vmap`). A fused group's K
small students then make one forward and one backward pass per batch instead of K, which pays where K
small passes leave the device idle (a GPU), and not where every pass already fills it (a CPU). Whether a
group stacks is measured on the device before it trains (`choose_batching`), never assumed.

Each student stays its own module with its own optimizer, schedule and checkpoints: the stacked weights are
made from the students' parameters every step (`torch.stack`, so gradients flow back to each student's own
`.grad`), and the BatchNorm statistics the stacked pass updates are copied back into each student.

The stacked pass computes in fp32, also in a bf16 or fp16 run: autocast does not reach vmap's batched
convolutions (bf16 images then meet fp32 weights and fail), and vmap's batch norm takes one dtype for the
input, the weights and the running statistics, which must stay fp32. The losses are fp32 either way.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..models.features import Outputs
from .compute import synchronise

BATCHING = ("auto", "stacked", "sequential")


class StackedStudents:
    """The forward pass of the students in `members`, computed once per batch for all of them."""

    def __init__(self):
        self.members: list[nn.Module] = []
        self._images = None
        self._logits: torch.Tensor | None = None
        self._read: set[int] = set()  # the members that took their logits of the last stacked pass
        self._template: nn.Module | None = None

    def add(self, student: nn.Module) -> Callable[[torch.Tensor], Outputs]:
        """Register `student` (same architecture as the others); its forward, answered from the stacked pass."""
        if self._template is None:
            self._template = copy.deepcopy(student).to("meta")
        self.members.append(student)

        def forward(images: torch.Tensor) -> Outputs:
            position = self._position(student)
            if self._images is not images or position in self._read:  # a new batch, or the next step on the same one
                self._logits, self._images, self._read = self._forward(images), images, set()
            self._read.add(position)
            return Outputs(self._logits[position])

        return forward

    def keep(self, students: list[nn.Module]) -> None:
        """Stack only `students` from now on (a diverged student leaves the group)."""
        self.members = [member for member in self.members if any(member is kept for kept in students)]
        self._images = None

    def _position(self, student: nn.Module) -> int:
        return next(k for k, member in enumerate(self.members) if member is student)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of every member on `images`, shape (members, batch, classes); BatchNorm statistics updated
        in each member as its own forward would update them."""
        template, members = self._template, self.members
        template.train(members[0].training)
        states = [dict(member.named_buffers()) for member in members]
        params = stacked_weights(members)
        buffers = {name: torch.stack([b[name] for b in states]) for name in states[0]}
        images = images.contiguous().float()

        def one(member_params, member_buffers):
            return functional_call(template, (member_params, member_buffers), (images,))

        with torch.autocast(images.device.type, enabled=False):
            logits = vmap(one, randomness="error")(params, buffers)
        with torch.no_grad():
            for k, state in enumerate(states):
                for name, buffer in state.items():
                    buffer.copy_(buffers[name][k])
        return logits


def stacked_weights(members: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Each parameter of `members` stacked along a new first axis, in the default memory format with its plain
    strides. A channels_last member's 1x1 convolution weight counts as contiguous in either format; stacked as it
    is, cuDNN reads it as channels_last and gives channels_last outputs, whose batch norm under vmap fails on CUDA
    ("NYI: querying is_contiguous inside of vmap"). Stacking flat copies and viewing them back sets the strides."""
    weights = [dict(member.named_parameters()) for member in members]
    return {
        name: torch.stack([w[name].reshape(-1) for w in weights]).view(len(members), *weights[0][name].shape)
        for name in weights[0]
    }


def why_not_stacked(students: list[nn.Module], student_points: tuple, compute) -> str | None:
    """Why these students cannot run stacked (None: they can): stacking maps the plain forward, so no
    feature points (a feature method), no random layers (dropout draws per student), no torch.compile, one
    process."""
    if len(students) < 2:
        return "one student"
    if student_points:
        return "the method reads the student's features"
    if any(isinstance(module, nn.modules.dropout._DropoutNd) for module in students[0].modules()):
        return "the student has dropout (each student's own random draws)"
    if compute.compile:
        return "device.compile=true"
    if compute.world.distributed:
        return "several processes"
    return None


def time_both(students: list[nn.Module], images: torch.Tensor, compute, steps: int = 3) -> dict[str, float]:
    """Seconds per training step of all `students` on `images` (median of `steps`, after one warm-up) one
    after another vs stacked: cross-entropy on fixed labels, each student's own SGD. Trains `students`:
    pass copies."""
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    optimizers = [torch.optim.SGD(student.parameters(), lr=1e-3) for student in students]
    stacked = StackedStudents()
    stacked_forwards = [stacked.add(student) for student in students]
    plain_forwards = [compute.forward(student, compile=False) for student in students]

    def sequential() -> None:
        for forward, optimizer in zip(plain_forwards, optimizers):
            with compute.autocast():
                loss = nn.functional.cross_entropy(forward(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def together() -> None:
        with compute.autocast():
            losses = [nn.functional.cross_entropy(forward(images).logits.float(), labels) for forward in stacked_forwards]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(losses)
        for optimizer in optimizers:
            optimizer.step()

    seconds = {}
    for name, run in (("sequential", sequential), ("stacked", together)):
        times = []
        for _ in range(steps + 1):
            synchronise(compute.device)
            start = time.perf_counter()
            run()
            synchronise(compute.device)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
    return seconds


def choose_batching(batching: str, students: list[nn.Module], student_points: tuple, images: torch.Tensor, compute) -> tuple[str, str]:
    """How a fused group's students train, "stacked" or "sequential", and a line saying why. `batching`:
    "sequential" (bit for bit as each job alone), "stacked" (where possible) or "auto" (whichever
    `time_both` measures faster on this device, with `students`: throwaway copies of the group's students,
    and `images`: one training batch)."""
    if batching == "sequential":
        return "sequential", "one after another (hydra.launcher.batching=sequential)"
    reason = why_not_stacked(students, student_points, compute)
    if reason is not None:
        return "sequential", f"one after another: not stackable ({reason})"
    if batching == "stacked":
        return "stacked", "stacked (hydra.launcher.batching=stacked)"
    seconds = time_both(students, images, compute)
    choice = min(seconds, key=seconds.get)
    measured = f"measured per step on {compute.device}: {seconds['sequential'] * 1e3:.1f} ms one after another, {seconds['stacked'] * 1e3:.1f} ms stacked"
    return choice, f"{'stacked' if choice == 'stacked' else 'one after another'} ({measured})"
