"""Measurements of a network on a loader: top-1 accuracy, overall and per class (speed: `ship.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compute import Compute


@dataclass
class Accuracy:
    overall: float
    per_class: list[float]


@torch.inference_mode()
def evaluate(model: nn.Module, loader, compute: Compute, num_classes: int) -> Accuracy:
    """Top-1 accuracy, overall and per class, of `model` on `loader`."""
    model.eval()
    forward = compute.forward(model, compile=False)
    correct = torch.zeros(num_classes, device=compute.device)
    total = torch.zeros(num_classes, device=compute.device)
    for batch in loader:
        with compute.autocast():
            logits = forward(batch.images)
        hits = (logits.argmax(1) == batch.labels).float()
        correct.index_add_(0, batch.labels, hits)
        total.index_add_(0, batch.labels, torch.ones_like(hits))
    correct, total = correct.cpu(), total.cpu()
    per_class = (correct / total.clamp(min=1)).tolist()
    return Accuracy(overall=(correct.sum() / total.sum().clamp(min=1)).item(), per_class=per_class)
