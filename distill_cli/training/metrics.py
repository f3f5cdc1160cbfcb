"""Measurements of a network on a loader: top-1 accuracy (overall and per class) and forward images/s.
"""

from __future__ import annotations

import statistics
import time
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


@torch.inference_mode()
def inference_rate(model: nn.Module, loader, compute: Compute, repeats: int = 3) -> float:
    """Median images/s of forward passes over `loader` (eval mode, autocast), after one warm-up pass."""
    model.eval()
    forward = compute.forward(model, compile=False)
    rates = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        predictions = []
        for batch in loader:
            with compute.autocast():
                predictions.append(forward(batch.images).argmax(1))
        torch.cat(predictions).cpu()  # waits for the device
        if repeat:
            rates.append(loader.num_images / (time.perf_counter() - start))
    return statistics.median(rates)
