"""The training engine: device and precision set-up, optimiser and schedule, the epoch loop.

A training step is any callable `step(images, labels) -> (loss_parts, logits)`; `fit` runs it
under autocast, accumulates losses and accuracy on the device (one host sync per epoch), evaluates
on the validation split, appends `metrics.jsonl` and writes `last.pt` / `best.pt` atomically.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import save_atomic
from .config import DeviceConfig, OptimizerConfig
from .errors import DistillError
from .report import EpochProgress

Step = Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Compute:
    """Where and how to compute: the resolved device and precision of a run."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def resolve_compute(cfg: DeviceConfig) -> Compute:
    """Pick the device (`auto`: CUDA when present) and precision (`auto`: bf16 on CUDA, else fp32)."""
    if cfg.type == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.type)
        except RuntimeError:
            raise DistillError(f"device.type: {cfg.type!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DistillError("device.type: CUDA requested but torch sees no CUDA device (use device=auto or cpu)")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DistillError(f"device.precision: fp16 needs CUDA (running on {device.type}); use bf16 or fp32")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    return Compute(device, precision)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW; weight decay is not applied to biases and normalisation parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=cfg.lr, betas=tuple(cfg.betas))


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


@dataclass
class Accuracy:
    overall: float
    per_class: list[float]


@torch.no_grad()
def evaluate(model: nn.Module, loader, compute: Compute, num_classes: int) -> Accuracy:
    """Top-1 accuracy, overall and per class, of `model` on `loader`."""
    model.eval()
    correct = torch.zeros(num_classes, device=compute.device)
    total = torch.zeros(num_classes, device=compute.device)
    for images, labels in loader:
        with compute.autocast():
            logits = model(images)
        hits = (logits.argmax(1) == labels).float()
        correct.index_add_(0, labels, hits)
        total.index_add_(0, labels, torch.ones_like(hits))
    correct, total = correct.cpu(), total.cpu()
    per_class = (correct / total.clamp(min=1)).tolist()
    return Accuracy(overall=(correct.sum() / total.sum().clamp(min=1)).item(), per_class=per_class)


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float | None  # None when there is no validation split (best = last)
    selection: str  # "val" (best on the validation split) or "last" (no validation split)


def fit(
    model: nn.Module,
    step: Step,
    train_loader,
    val_loader,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    compute: Compute,
    epochs: int,
    num_classes: int,
    run_dir: Path,
    make_checkpoint: Callable[[dict], dict],
    label: str,
) -> FitResult:
    """Train for `epochs`, writing metrics.jsonl, last.pt and best.pt (best val accuracy) into `run_dir`.

    `make_checkpoint(state)` wraps the training state into a model checkpoint dict.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    scaler = compute.grad_scaler()
    best = FitResult(best_epoch=0, best_val_acc=None, selection="val" if val_loader is not None else "last")
    with EpochProgress(label, epochs, len(train_loader)) as progress:
        for epoch in range(1, epochs + 1):
            progress.start_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            losses, train_acc, seen = _train_epoch(model, step, train_loader, optimizer, scaler, compute, progress)
            seconds = time.perf_counter() - start
            bad = [name for name, value in losses.items() if not math.isfinite(value)]
            if bad:
                raise DistillError(f"{label}: non-finite {', '.join(bad)} in epoch {epoch}; stopping (last.pt holds epoch {epoch - 1})")
            scheduler.step()
            val_acc = evaluate(model, val_loader, compute, num_classes).overall if val_loader is not None else None
            metrics = {
                "epoch": epoch,
                **losses,
                "train_acc": train_acc,
                "val_acc": val_acc,
                "lr": lr,
                "images_per_s": seen / seconds,
                "seconds": seconds,
            }
            with metrics_path.open("a") as file:
                file.write(json.dumps(metrics) + "\n")
            progress.end_epoch(metrics, list(losses))
            state = {"epoch": epoch, "val_acc": val_acc, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            checkpoint = make_checkpoint(state)
            save_atomic(checkpoint, run_dir / "last.pt")
            if val_acc is None or best.best_val_acc is None or val_acc > best.best_val_acc:
                best.best_epoch, best.best_val_acc = epoch, val_acc
                save_atomic(checkpoint, run_dir / "best.pt")
    return best


def _train_epoch(model, step: Step, loader, optimizer, scaler, compute: Compute, progress) -> tuple[dict, float, int]:
    """One pass over `loader`; returns mean loss parts, train accuracy and images seen (one host sync)."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=compute.device)
    seen = 0
    for images, labels in loader:
        with compute.autocast():
            parts, logits = step(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        batch = len(labels)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * batch
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += batch
        progress.advance()
    means = {name: (total / seen).item() for name, total in sums.items()}
    return means, correct.item() / seen, seen


def cross_entropy_step(model: nn.Module) -> Step:
    """Plain supervised training (teachers, and the reference for students)."""

    def step(images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return {"loss": loss}, logits

    return step


def distillation_step(student: nn.Module, teacher: nn.Module | None, loss_fn: nn.Module) -> Step:
    """Student step with a frozen teacher (eval mode, no grad); `teacher=None` when alpha == 0."""

    def step(images: torch.Tensor, labels: torch.Tensor):
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(images)
        logits = student(images)
        return loss_fn(logits, teacher_logits, labels), logits

    return step
