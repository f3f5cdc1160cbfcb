"""The teacher-view store on disk (`cache_teacher=views|auto`): the frozen teacher's logits for every augmented
view of every training image, built once and kept beside the cached teachers, so every later run, seed and
sweep job against that teacher reads it instead of running the teacher.

Layout: `<teacher_cache>/views/<arch>-<key>/logits.pt` (and `recipe.json`), where the key hashes the
teacher's weights (a retrained or different teacher is another store, never a stale one), the transfer set
(dataset, split, excluded classes), the augmentation preset, the precision the teacher runs in and the
store's dtype. A file lock per key makes parallel jobs wait for the one that builds it; an interrupted build
continues from `logits.pt.partial`. With several data-parallel processes rank 0 builds and every rank reads
the same file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from ..core.checkpoint import save_atomic
from ..core.files import write_json_atomic
from ..data.augment import DRAWN_VIEWS_SEED
from ..kd.teachers import teacher_view_logits, view_store_bytes, views_pay
from ..training.device_memory import GIB
from .common import KDRun, log
from .teacher_cache import dataset_recipe, recipe_key

PROGRESS_STEPS = 10  # the partial store is saved (and a line logged) this many times during a build


def weights_sha256(teacher: nn.Module) -> str:
    """A hash of the teacher's weights and buffers (and an ensemble's temperature): what its outputs depend on."""
    digest = hashlib.sha256(repr(getattr(teacher, "T", None)).encode())
    for name, value in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def view_store_recipe(run: KDRun, teacher: nn.Module) -> dict:
    """What determines the store: the teacher's weights, the transfer set, the views, how the teacher runs."""
    augment = run.loaders.train.augment
    return {
        "arch": run.cfg.teacher.arch,
        "teacher_sha256": weights_sha256(teacher),
        "dataset": dataset_recipe(run.cfg.dataset),  # the transfer set, its excluded classes included
        "augment": asdict(augment) | ({"drawn_seed": DRAWN_VIEWS_SEED} if augment.drawn else {}),
        "precision": run.compute.precision,
        "dtype": run.cfg.teacher_views_dtype,
    }


def teacher_view_store(run: KDRun, teacher: nn.Module, students: int = 1) -> torch.Tensor | None:
    """The store of `teacher`'s logits for every view of every transfer image, on the run's device: read from
    the cache, or built into it (the build cost, the break-even and the size logged before it starts). With
    `cache_teacher=auto`, None where it would not pay (`views_pay`: not stored, and the `students` training
    against the teacher together run fewer epochs than it has views)."""
    cfg, data, compute = run.cfg, run.data, run.compute
    augment = run.loaders.train.augment
    recipe = view_store_recipe(run, teacher)
    path = Path(cfg.teacher_cache) / "views" / recipe_key(recipe) / "logits.pt"
    size = view_store_bytes(cfg, augment, len(data.train), data.info.num_classes)
    epochs = cfg.epochs * students
    if cfg.cache_teacher == "auto" and not views_pay(augment.view_count, epochs, compute.world.on_main(path.is_file)):
        log.info(
            f"teacher views: not stored, and {epochs} student epochs run the teacher fewer times than the "
            f"{augment.view_count} passes a store costs; the teacher runs live"
        )
        return None

    def stored() -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            if not path.is_file():
                log.info(
                    f"teacher views: building the store of {augment.view_count} views x {len(data.train):,} images x "
                    f"{data.info.num_classes} classes ({size / GIB:.2f} GiB, {cfg.teacher_views_dtype}) into {path}: "
                    f"{augment.view_count} teacher passes over the transfer set, paid back after {augment.view_count} "
                    f"student epochs (this run trains {epochs})"
                )
                _build(run, teacher, recipe, path)
            else:
                log.info(f"teacher views: reading {path}")
        return str(path)

    store = torch.load(compute.world.on_main(stored), map_location=compute.device, weights_only=True)
    return store


def _build(run: KDRun, teacher: nn.Module, recipe: dict, path: Path) -> None:
    """Build the store into `path`, continuing a partial build where one was saved."""
    cfg, data, compute = run.cfg, run.data, run.compute
    augment = run.loaders.train.augment
    partial_path = path.with_suffix(".pt.partial")
    shape = (len(data.train), augment.view_count, data.info.num_classes)
    table = torch.empty(shape, dtype=getattr(torch, cfg.teacher_views_dtype), device=compute.device)
    start = 0
    if partial_path.is_file():
        partial = torch.load(partial_path, map_location=compute.device, weights_only=True)
        start = partial["done"]
        table[:start] = partial["table"]
        log.info(f"teacher views: continuing the build after {start:,} of {len(data.train):,} images")
    began, every = time.perf_counter(), max(1, len(data.train) // PROGRESS_STEPS)
    next_save = start + every

    def done(images: int) -> None:
        nonlocal next_save
        if images >= next_save and images < len(data.train):
            save_atomic({"done": images, "table": table[:images].cpu()}, partial_path)
            log.info(f"teacher views: {images:,} of {len(data.train):,} images ({time.perf_counter() - began:.0f} s)")
            next_save = images + every

    teacher_view_logits(
        teacher, data.train, run.loaders.train, compute, data.info.num_classes, table, start,
        chunk=cfg.eval_batch_size, done=done,
    )
    write_json_atomic(recipe, path.parent / "recipe.json")
    save_atomic(table.cpu(), path)
    partial_path.unlink(missing_ok=True)
    log.info(f"teacher views: built in {time.perf_counter() - began:.1f} s")
