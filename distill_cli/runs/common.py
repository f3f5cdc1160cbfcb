"""What the run commands share: fitting a network with the run's optimizer, schedule, checkpoints and
resume; the summary entry of a trained network; a run's header; and `KDRun`, what every part of a kd run
(each training mode, each fused job) works with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.checkpoint import (
    BEST,
    load_checkpoint,
    load_resume_checkpoint,
    model_checkpoint,
)
from ..core.config import (
    KDConfig,
    ModelConfig,
    RunConfig,
    to_plain,
)
from ..core.errors import DistillError
from ..data import DataSplits
from ..kd.objective import needs_teacher
from ..kd.teachers import Shared
from ..losses import LOSSES
from ..models import count_parameters
from ..models.checkpoints import recorded_layers
from ..training.compute import Compute
from ..training.graphs import use_graphs
from ..training.loop import FitResult, fit
from ..training.metrics import evaluate, top5_entry
from ..training.optim import build_optimizer, build_scheduler
from ..training.setup import Loaders
from ..training.trackers import Trackers

log = logging.getLogger("distill")


def fit_options(
    model: nn.Module,
    step,
    cfg: RunConfig,
    epochs: int,
    compute: Compute,
    data: DataSplits,
    loaders: Loaders,
    run_dir: Path,
    label: str,
    trackers: Trackers,
    make_checkpoint: Callable[[dict], dict],
    method: nn.Module | None = None,
    **fit_options,
) -> dict:
    """`fit`'s (and `Training`'s) arguments for `model` (and `method`'s trainable parts, with the same optimizer)
    with the run's optimizer and schedule; with `cfg.resume`, from the run's last checkpoint. `fit_options`
    go to `fit` as they are. The optimizer is built graph-safe when the steps replay from CUDA graphs
    (`training.graphs.use_graphs`, which logs why not under `device.cuda_graphs=auto`)."""
    trained = model if method is None else nn.ModuleList([model, method])
    graphs = use_graphs(cfg.device.cuda_graphs, compute, cfg.optimizer, label)
    optimizer = build_optimizer(trained, cfg.optimizer, compute.device, graph_safe=graphs)
    scheduler = build_scheduler(optimizer, cfg.optimizer, epochs)
    # with several processes rank 0 reads the checkpoint and every rank gets it
    resume_from = compute.world.on_main(lambda: load_resume_checkpoint(run_dir, to_plain(cfg))) if cfg.resume else None
    return dict(
        model=model,
        step=step,
        train_loader=loaders.train,
        val_loader=loaders.val,
        optimizer=optimizer,
        scheduler=scheduler,
        compute=compute,
        epochs=epochs,
        num_classes=data.info.num_classes,
        run_dir=run_dir,
        make_checkpoint=make_checkpoint,
        label=label,
        resume_from=resume_from,
        method=method,
        trackers=trackers,
        cuda_graphs=cfg.device.cuda_graphs if graphs else "false",
        clip_grad_norm=cfg.optimizer.clip_grad_norm,
        **fit_options,
    )


def fit_network(*args, **options) -> FitResult:
    """`fit` with `fit_options(*args, **options)`."""
    return fit(**fit_options(*args, **options))


def checkpoint_maker(model: nn.Module, model_cfg: ModelConfig, cfg: RunConfig, data: DataSplits) -> Callable[[dict], dict]:
    """`make_checkpoint` for `fit`: `model`'s weights, what rebuilds it (with its pruned layer shapes, when
    it was pruned), and the run's config."""
    config = to_plain(cfg)
    layers = recorded_layers(model, model_cfg, data.info)
    structure = {"layers": layers} if layers else {}

    def make_checkpoint(state: dict) -> dict:
        return model_checkpoint(
            model, model_cfg.arch, model_cfg.kwargs, data.info.num_classes, dataset=data.info.name, config=config, **structure, **state
        )

    return make_checkpoint


def trained_result(
    model: nn.Module, model_cfg: ModelConfig, result: FitResult, best_path: Path, compute: Compute, data: DataSplits, loaders: Loaders
) -> dict:
    """The summary entry of a trained network: test accuracy of its last weights (as `model` holds them)
    and of `best_path`'s, which it leaves loaded."""
    last = evaluate(model, loaders.test, compute, data.info.num_classes)
    model.load_state_dict(load_checkpoint(best_path)["state_dict"])
    best = evaluate(model, loaders.test, compute, data.info.num_classes)
    return {
        "name": model_cfg.label,
        "arch": model_cfg.arch,
        "kwargs": dict(model_cfg.kwargs),
        "params": count_parameters(model),
        "test_acc_best": best.overall,
        "test_acc_last": last.overall,
        "test_acc_per_class": dict(zip(data.info.class_names, best.per_class)),
        **top5_entry(best, "test_acc_top5_best"),
        "best_epoch": result.best_epoch,
        "val_acc_best": result.best_val_acc,
        "selection": result.selection,
        "checkpoint": str(best_path),
    }


def train_network(
    model: nn.Module,
    model_cfg: ModelConfig,
    step,
    cfg: RunConfig,
    epochs: int,
    compute: Compute,
    data: DataSplits,
    loaders: Loaders,
    run_dir: Path,
    label: str,
    trackers: Trackers,
    method: nn.Module | None = None,
) -> dict | None:
    """Fit `model` (see `fit_network`), then report test accuracy of its best and last checkpoints;
    leaves the best weights loaded. With several processes every one trains; rank 0 alone tests and
    returns the result (None elsewhere)."""
    make_checkpoint = checkpoint_maker(model, model_cfg, cfg, data)
    result = fit_network(model, step, cfg, epochs, compute, data, loaders, run_dir, label, trackers, make_checkpoint, method)
    if not compute.world.is_main:
        return None
    return trained_result(model, model_cfg, result, run_dir / BEST, compute, data, loaders)


def _data_facts(data: DataSplits) -> dict:
    """What the run's data is, as loaded: classes, image shape and split sizes (train: the transfer set,
    after any excluded classes)."""
    info = data.info
    return {
        "num_classes": info.num_classes,
        "channels": info.channels,
        "image_size": list(info.image_size),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "test_images": len(data.test),
    }


def run_header(command: str, cfg: RunConfig, compute: Compute, data: DataSplits, loaders: Loaders, run_dir: Path) -> dict:
    log.info(
        f"distill {command}: {data.info.name} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)}) "
        f"on {compute.device} {compute.precision} ({compute.threads} CPU thread{'s' if compute.threads != 1 else ''}), "
        f"{loaders.pipeline} pipeline -> {run_dir}"
    )
    return {
        "command": command,
        "status": "completed",
        "dataset": data.info.name,
        "device": str(compute.device),
        "precision": compute.precision,
        "threads": compute.threads,  # torch's CPU threads (device.threads, or a parallel sweep job's share)
        "pipeline": loaders.pipeline,
        "processes": compute.world.size,  # data-parallel; a step's batch is batch_size x processes
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "exclude_classes": list(cfg.dataset.exclude_classes),
        "data": _data_facts(data),
        "run_dir": str(run_dir),
        **({"published": published_entry(cfg)} if cfg.published.given else {}),
    }


PUBLISHED_SUFFIXES = ("_kd", "_dot")  # a published method key: the loss name, then "_kd" (Hinton's term added), "_dot"


def published_key(cfg: KDConfig) -> str | None:
    """The key of `published.kd` this run's student is set beside: the method, "_kd" where Hinton's term comes
    with another method (alpha > 0), "_dot" under optimizer=dot; None for a student trained alone (set beside
    `published.student`) and for the training modes (a preset publishes one student per teacher)."""
    if cfg.mode != "single" or not needs_teacher(cfg):
        return None
    name = cfg.loss["name"]
    return name + "_kd" * (name != "kd" and cfg.alpha > 0) + "_dot" * (cfg.optimizer.name == "dot")


def published_entry(cfg: RunConfig) -> dict:
    """The summary's `published` entry: the preset's published numbers for what this run trains, and `differs`:
    what of this run is not what they were published with (its dataset, its epochs, the method's settings). A `published.kd`
    key that names no method is refused in one line."""
    published = cfg.published
    for key in published.kd:
        name = key
        for suffix in reversed(PUBLISHED_SUFFIXES):
            name = name.removesuffix(suffix)
        if name not in LOSSES:
            raise DistillError(f"published.kd.{key}: {name!r} is no method (loss=); a key is the loss name, then _kd, then _dot")
    entry = {"source": published.source, "epochs": published.epochs, "teacher": published.teacher, "differs": []}
    if published.dataset is not None and cfg.dataset.name != published.dataset:
        entry["differs"].append(f"dataset {cfg.dataset.name} (published: {published.dataset})")
    if published.epochs is not None and cfg.epochs != published.epochs:
        entry["differs"].append(f"epochs {cfg.epochs} (published: {published.epochs})")
    if isinstance(cfg, KDConfig):
        key = published_key(cfg)
        entry.update(student=published.student, method=key, kd=published.kd.get(key) if key else None)
        for name, value in published.settings.get(key, {}).items():
            if cfg.loss.get(name) != value:
                entry["differs"].append(f"loss.{name} {cfg.loss.get(name)} (published: {value})")
    return entry


@dataclass
class KDRun:
    """What every part of a kd run works with: its config, folder, device, data, loaders and trackers, and
    what it shares with the runs fused with it (`Shared`)."""

    cfg: KDConfig
    run_dir: Path
    compute: Compute
    data: DataSplits
    loaders: Loaders
    trackers: Trackers
    shared: Shared = field(default_factory=Shared)
    # a whole `distill kd` run of another config into a folder, returning its summary (`runs.kd.run_kd`):
    # how born-again generations and assistant links run theirs
    nested: Callable[[KDConfig, Path], dict] | None = None

    def evaluate(self, model: nn.Module):
        """`model`'s test accuracy (overall and per class)."""
        return evaluate(model, self.loaders.test, self.compute, self.data.info.num_classes)
