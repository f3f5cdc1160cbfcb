"""The optimiser (SGD, Adam, AdamW with a fused/foreach kernel, or DOT) and its per-epoch learning-rate schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.config import OptimizerConfig
from ..core.errors import DistillError
from .compute import Compute

TASK_TERM = "ce"  # the task term of a step ("loss/ce", `losses.base.Objective`; a mutual-learning peer's "loss/<peer>/ce")


class DistillationOrientedSGD(torch.optim.Optimizer):
    """DOT (Zhao et al., "DOT: A Distillation-Oriented Trainer", ICCV 2023): SGD with one momentum buffer for the
    task loss's gradient (momentum - delta) and another for the distillation loss's (momentum + delta), so the
    distillation terms carry more of their history and the task term less. A parameter that only one of the two
    reaches keeps plain `momentum`; with no distillation term (a teacher or a student trained alone) it is SGD.
    Weight decay goes with the task gradient (with the distillation one where the task loss does not reach).

    Each step takes two gradients: `stash(distillation_loss)` keeps the distillation terms' (a backward pass of
    its own), then the task loss's backward fills `.grad` as usual and `step()` uses both."""

    def __init__(self, params, lr: float, momentum: float, delta: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self.distillation_grads: dict[torch.Tensor, torch.Tensor] = {}

    def stash(self, distillation_loss: torch.Tensor) -> None:
        """The gradients of `distillation_loss` for this step, kept aside (`.grad` is left to the task loss)."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads = torch.autograd.grad(distillation_loss, params, retain_graph=True, allow_unused=True)
        self.distillation_grads = {p: g for p, g in zip(params, grads) if g is not None}

    @staticmethod
    def _momentum(state: dict, key: str, d_p: torch.Tensor, momentum: float) -> torch.Tensor:
        buffer = state.get(key)
        if buffer is None:
            state[key] = buffer = d_p.detach().clone()
        else:
            buffer.mul_(momentum).add_(d_p)
        return buffer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, delta, decay = group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                task, distillation = p.grad, self.distillation_grads.get(p)
                if task is None and distillation is None:
                    continue
                both = task is not None and distillation is not None
                decayed = task if task is not None else distillation
                decayed = decayed.add(p, alpha=decay) if decay else decayed
                state = self.state[p]
                buffers = []
                if task is not None:
                    buffers.append(self._momentum(state, "momentum_buffer", decayed, momentum - delta if both else momentum))
                if distillation is not None:
                    d_p = distillation if both else decayed
                    buffers.append(self._momentum(state, "distillation_momentum_buffer", d_p, momentum + delta if both else momentum))
                for buffer in buffers:
                    p.add_(buffer, alpha=-group["lr"])
        self.distillation_grads = {}
        return loss


def task_and_distillation(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A step's loss split for DOT: the sum of its task terms (`TASK_TERM`; the whole loss of a step without named
    terms, as a network trained alone) and the sum of its other "loss/..." terms (None where there is none)."""
    terms = {name: value for name, value in parts.items() if name.startswith("loss/")}
    if not terms:
        return parts["loss"], None
    task = [value for name, value in terms.items() if name.rsplit("/", 1)[-1] == TASK_TERM]
    distillation = [value for name, value in terms.items() if name.rsplit("/", 1)[-1] != TASK_TERM]
    return (sum(task) if task else None), (sum(distillation) if distillation else None)


def loss_to_backpropagate(optimizer: torch.optim.Optimizer, parts: dict[str, torch.Tensor], scale) -> torch.Tensor | None:
    """The loss of a step whose backward fills `.grad`, scaled by `scale` (a GradScaler's): the whole loss, or for
    DOT the task term once the distillation terms' gradients are stashed (None: no task term, nothing to fill)."""
    if not isinstance(optimizer, DistillationOrientedSGD):
        return scale(parts["loss"])
    task, distillation = task_and_distillation(parts)
    if distillation is not None:
        optimizer.stash(scale(distillation))
    return None if task is None else scale(task)


def check_optimizer(cfg: OptimizerConfig, compute: Compute) -> None:
    """Refuse in one line an optimizer this run's compute cannot drive: DOT under fp16 (the GradScaler unscales
    and inf-checks `.grad` only, not DOT's stashed gradients), with several processes (DistributedDataParallel
    averages the gradients of one backward pass a step) or compiled (torch.compile's backward frees its buffers)."""
    if cfg.name != "dot":
        return
    if compute.precision == "fp16":
        raise DistillError("optimizer.name=dot: device.precision=fp16 is not supported (the GradScaler sees one of DOT's two gradients); use bf16 or fp32")
    if compute.world.distributed:
        raise DistillError("optimizer.name=dot: runs in one process (DistributedDataParallel averages one of DOT's two gradients)")
    if compute.compile:
        raise DistillError("optimizer.name=dot: device.compile=true is not supported (a compiled backward runs once a step, DOT's twice)")


def _optimizer_kernel(impl: str, device: torch.device) -> dict:
    """The fused/foreach keyword for `optimizer.impl` (auto: fused where torch has it, on CUDA and CPU)."""
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}.get(impl, {})


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device, graph_safe: bool = False) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW / DOT over `model`'s trainable parameters with the `optimizer.impl` kernel; weight decay
    on every parameter with `optimizer.decay_all`, else none on 1-D ones (biases, norm parameters).
    `graph_safe`: a step a CUDA graph can replay (`training.graphs`): the fused kernel (no host sync, the
    GradScaler's scale and inf check taken as tensors), capturable, and the learning rate a tensor on the device,
    which the schedule fills in place (a float would be baked into the graph)."""
    decay, no_decay = [], []
    for parameter in (p for p in model.parameters() if p.requires_grad):
        (decay if cfg.decay_all or parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "dot":
        return DistillationOrientedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.dot_delta)
    kernel = _optimizer_kernel(cfg.impl, device)
    lr = cfg.lr
    if graph_safe:
        kernel, lr = {"fused": True}, torch.tensor(cfg.lr, device=device)
    try:
        if cfg.name == "sgd":
            nesterov = cfg.nesterov and cfg.momentum > 0
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov, **kernel)
        optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return optimizer_class(groups, lr=lr, betas=tuple(cfg.betas), **kernel, **({"capturable": True} if graph_safe else {}))
    except RuntimeError as error:  # e.g. no fused kernel for this device
        raise DistillError(f"optimizer.impl={cfg.impl}: {str(error).strip().splitlines()[0]}") from None


def keep_lr_kind(optimizer: torch.optim.Optimizer, graph_safe: bool, device: torch.device) -> None:
    """Each group's learning rate as `build_optimizer(graph_safe=...)` makes it, after `load_state_dict` put in the
    saved kind (a run resumed with or without CUDA graphs): a float32 tensor on `device` for a graph-safe optimizer
    (a float would be frozen into the graph), else a float."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        group["lr"] = torch.tensor(float(lr), device=device) if graph_safe else float(lr)


def lr_factor(cfg: OptimizerConfig, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier for 0-based `epoch`: linear warm-up, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= round(m * epochs) for m in cfg.milestones)
    progress = (epoch - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, epochs: int):
    """A per-epoch LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, epochs))
