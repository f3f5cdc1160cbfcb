"""`distill quantize <checkpoint> qat=true epochs=N`: quantization-aware training, healed by the fp32 model.

`ship.quantize` prepares the network with fake quantization (the post-training flow's quantizer in its QAT
form) and converts it afterwards; in between it is fine-tuned here for N epochs on the checkpoint's training
data with the fp32 model as the frozen teacher: the objective of `distill kd loss=kd`, (1 - alpha) CE +
alpha T^2 KL(teacher || student) at temperature T, with the run's optimizer at `lr_scale` times its learning
rate, through the training loop, which writes `<out>/qat/last.pt` atomically after each epoch. The same
command run again continues an interrupted fine-tune from there (a finished one is converted at once).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

from ..core.checkpoint import load_checkpoint, load_resume_checkpoint, model_checkpoint
from ..core.config import to_plain
from ..core.errors import DistillError
from ..kd.objective import kd_step
from ..losses.base import Objective, build_method
from ..ship.quantize import FineTuning, run_quantize
from ..training.loop import fit
from ..training.optim import build_optimizer, build_scheduler
from ..training.rng import seed_everything


def check_qat_options(options: dict) -> None:
    """Refuse a QAT option out of range in one line, before anything is loaded."""
    if options["epochs"] < 1:
        raise DistillError(f"qat=true needs epochs=N with N >= 1 (the fine-tune's length), got epochs={options['epochs']}")
    for key in ("T", "lr_scale"):
        if not (math.isfinite(options[key]) and options[key] > 0):
            raise DistillError(f"{key}: must be a finite number > 0, got {options[key]}")
    if not 0 <= options["alpha"] <= 1:
        raise DistillError(f"alpha: must be in [0, 1], got {options['alpha']}")


def run_qat(path: str | Path, overrides: list[str], options: dict) -> dict:
    """`distill quantize ... qat=true`: `run_quantize` with the fine-tune below (a third row: int8 QAT)."""
    check_qat_options(options)
    return run_quantize(path, overrides, options, fine_tune=partial(fine_tune_with_teacher, options=options))


def qat_recipe(tuning: FineTuning, options: dict) -> dict:
    """What decides the fine-tune: last.pt is resumed only by the same recipe."""
    cfg = tuning.config
    return {
        "checkpoint": str(tuning.source),
        "epochs": options["epochs"],
        "T": options["T"],
        "alpha": options["alpha"],
        "lr": cfg.optimizer.lr * options["lr_scale"],
        "optimizer": to_plain(cfg.optimizer),
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "dataset": to_plain(cfg.dataset),
    }


def fine_tune_with_teacher(tuning: FineTuning, options: dict) -> dict:
    """Fine-tune `tuning.network` with the fp32 model as teacher (`ship.quantize.FineTune`); returns the recipe
    and the folder of its metrics.jsonl and last.pt."""
    cfg, compute, data, loaders = tuning.config, tuning.compute, tuning.data, tuning.loaders
    recipe = qat_recipe(tuning, options)
    try:
        resume_from = load_resume_checkpoint(tuning.folder, recipe)
    except DistillError as error:
        raise DistillError(f"{error}; delete {tuning.folder} (or give another out=) to start afresh") from None
    optimizer_cfg = dataclasses.replace(cfg.optimizer, lr=recipe["lr"])
    network = compute.place(tuning.network)
    objective = Objective(build_method({"name": "kd"}), options["T"], options["alpha"])
    teacher = compute.frozen_forward(tuning.fp32, info=data.info)
    step = kd_step(compute.outputs(network, data.info), lambda batch: teacher(batch.images), objective)
    optimizer = build_optimizer(network, optimizer_cfg, compute.device)
    saved = load_checkpoint(tuning.source)

    def make_checkpoint(state: dict) -> dict:
        return model_checkpoint(network, saved["arch"], saved["kwargs"], data.info.num_classes, dataset=data.info.name, config=recipe, **state)

    seed_everything(cfg.seed)
    fit(
        network, step, loaders.train, loaders.val, optimizer=optimizer, scheduler=build_scheduler(optimizer, optimizer_cfg, options["epochs"]),
        compute=compute, epochs=options["epochs"], num_classes=data.info.num_classes, run_dir=tuning.folder,
        make_checkpoint=make_checkpoint, label="qat", resume_from=resume_from,
        # the last epoch is converted; no best.pt (a fake-quantized graph's weights, which no model loads)
        save_best=lambda epoch, history: None,
    )
    return {**recipe, "folder": str(tuning.folder)}
