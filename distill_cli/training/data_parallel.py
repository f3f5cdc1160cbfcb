"""The model side of data-parallel training over a `core.world.World`: the student in DistributedDataParallel,
and a KD method's trainable parts, which DDP does not see, with their gradients averaged over the ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.world import World


def data_parallel(model: nn.Module, world: World, sync_batchnorm: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel (gradients averaged over ranks in backward, rank 0's BatchNorm
    statistics broadcast at each forward; with `sync_batchnorm`, BatchNorm layers computing their statistics
    over every rank's batch); `model` itself when training alone."""
    if not world.distributed:
        return model
    if sync_batchnorm:  # the layers are replaced; their weights and statistics stay the model's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def average_gradients(module: nn.Module, world: World) -> None:
    """Average the gradients of `module`'s trainable parameters over ranks (a KD method's parts: DDP wraps
    the student, whose forward it sees, not the loss)."""
    if not world.distributed:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = world.sum(torch.cat([g.reshape(-1) for g in grads])) / world.size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
