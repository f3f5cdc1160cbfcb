"""A cache of trained teachers keyed by their recipe, so sweeps and repeated kd runs train a teacher once.

Layout: `<cache>/<key>/teacher.pt` and `<cache>/<key>/recipe.json`, where key is a hash of the recipe
(dataset and split, an image folder's location, architecture, optimizer with schedule, epochs, batch
size, seed, label smoothing). A file lock per key makes parallel jobs wait for the one that trains it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from ..core.config import DatasetConfig, TrainConfig
from ..core.files import write_json_atomic


def dataset_recipe(dataset: DatasetConfig) -> dict:
    """What of `dataset` determines the data a model learns from, not where its files live or how they are read."""
    recipe = asdict(dataset)
    for execution_only in ("download", "cache_dir", "pipeline", "device_max_gb", "workers"):
        recipe.pop(execution_only)
    # the root of a torchvision dataset only says where its files are; an image folder's root is its data
    if dataset.name == "imagefolder":
        recipe["root"] = str(Path(dataset.root).resolve())
    else:
        recipe.pop("root")
    return recipe


def teacher_recipe(cfg: TrainConfig, processes: int = 1) -> dict:
    """Everything that determines the trained teacher, not where files live or how it is computed
    (device, data pipeline, optimizer kernel): those change rounding and random draws, not the recipe.
    Trained by several data-parallel `processes`, a step's batch is batch_size x processes and BatchNorm
    sees each process's share (or the whole, with device.sync_batchnorm): that is another recipe."""
    dataset = dataset_recipe(cfg.dataset)
    optimizer = asdict(cfg.optimizer)
    optimizer.pop("impl")
    for default_absent in ("decay_all", "clip_grad_norm"):  # off: absent, as in the recipes cached before the keys
        if not optimizer[default_absent]:
            optimizer.pop(default_absent)
    # a network trained alone under DOT trains as under SGD (it has no distillation term): the same recipe
    optimizer.pop("dot_delta")
    if optimizer["name"] == "dot":
        optimizer["name"] = "sgd"
    return {
        "dataset": dataset,
        "arch": cfg.teacher.arch,
        "kwargs": dict(cfg.teacher.kwargs),
        "optimizer": optimizer,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        # absent when 0, as in the recipes cached before the key existed
        **({"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}),
        **({"processes": processes, "sync_batchnorm": cfg.device.sync_batchnorm} if processes > 1 else {}),
    }


def recipe_key(recipe: dict) -> str:
    text = json.dumps(recipe, sort_keys=True)
    return f"{recipe['arch']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class TeacherCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def checkpoint_path(self, recipe: dict) -> Path:
        return self.root / recipe_key(recipe) / "teacher.pt"

    def lookup(self, recipe: dict) -> Path | None:
        path = self.checkpoint_path(recipe)
        return path if path.is_file() else None

    def lock(self, recipe: dict) -> FileLock:
        """Held while one process looks up, trains and publishes the teacher for `recipe`."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{recipe_key(recipe)}.lock"))

    def publish(self, recipe: dict, checkpoint: Path) -> Path:
        """Copy a trained teacher checkpoint into the cache (atomically: copy to a temp name, rename)."""
        target = self.checkpoint_path(recipe)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(recipe, target.parent / "recipe.json")
        partial = target.with_suffix(".pt.partial")
        shutil.copyfile(checkpoint, partial)
        partial.replace(target)
        return target
