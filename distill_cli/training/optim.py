"""The optimiser (SGD, Adam, AdamW with a fused/foreach kernel) and its per-epoch learning-rate schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.config import OptimizerConfig
from ..core.errors import DistillError


def _optimizer_kernel(impl: str, device: torch.device) -> dict:
    """The fused/foreach keyword for `optimizer.impl` (auto: fused where torch has it, on CUDA and CPU)."""
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}.get(impl, {})


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device, graph_safe: bool = False) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over `model`'s trainable parameters with the `optimizer.impl` kernel; weight decay
    on every parameter with `optimizer.decay_all`, else none on 1-D ones (biases, norm parameters).
    `graph_safe`: a step a CUDA graph can replay (`training.graphs`): the fused kernel (no host sync, the
    GradScaler's scale and inf check taken as tensors), capturable, and the learning rate a tensor on the device,
    which the schedule fills in place (a float would be baked into the graph)."""
    decay, no_decay = [], []
    for parameter in (p for p in model.parameters() if p.requires_grad):
        (decay if cfg.decay_all or parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
