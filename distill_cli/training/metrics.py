"""Measurements of a network on a loader: top-1 accuracy, overall and per class, and top-5 (speed: `ship.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compute import Compute


# top-5 accuracy is measured from this many classes on (ImageNet's and CIFAR-100's tables; at 10 classes it says little)
TOP5_FROM_CLASSES = 100


@dataclass
class Accuracy:
    overall: float
    per_class: list[float]
    top5: float | None = None  # with at least TOP5_FROM_CLASSES classes


@torch.inference_mode()
def evaluate(model: nn.Module, loader, compute: Compute, num_classes: int) -> Accuracy:
    """Top-1 accuracy, overall and per class, of `model` on `loader`; top-5 too from TOP5_FROM_CLASSES classes."""
    model.eval()
    forward = compute.forward(model, compile=False)
    correct = torch.zeros(num_classes, device=compute.device)
    total = torch.zeros(num_classes, device=compute.device)
    top5 = torch.zeros((), device=compute.device)
    for batch in loader:
        with compute.autocast():
            logits = forward(batch.images)
        hits = (logits.argmax(1) == batch.labels).float()
        correct.index_add_(0, batch.labels, hits)
        total.index_add_(0, batch.labels, torch.ones_like(hits))
        if num_classes >= TOP5_FROM_CLASSES:
            top5 += top5_hits(logits, batch.labels).sum()
    correct, total = correct.cpu(), total.cpu()
    per_class = (correct / total.clamp(min=1)).tolist()
    count = total.sum().clamp(min=1)
    return Accuracy(
        overall=(correct.sum() / count).item(), per_class=per_class,
        top5=(top5.cpu() / count).item() if num_classes >= TOP5_FROM_CLASSES else None,
    )


def top5_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each label is among its row's 5 highest logits."""
    return (logits.topk(5, 1).indices == labels[:, None]).any(1)


def top5_entry(accuracy: Accuracy, key: str) -> dict:
    """`{key: top-5 accuracy}` for a summary entry, or nothing where top-5 is not measured."""
    return {} if accuracy.top5 is None else {key: accuracy.top5}
