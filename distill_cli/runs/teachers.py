"""Where a kd run's trained networks come from: the teacher (a given checkpoint, or trained once per recipe
and cached for every later run, or an ensemble of such members), the same student trained alone (the
baseline), and a chain's assistants; each loaded frozen and checked, with its summary entry.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..core.checkpoint import BEST
from ..core.config import ENSEMBLE, KDConfig, ModelConfig, TeacherConfig, TrainConfig
from ..core.run_folders import run_status
from ..core.world import SINGLE, World
from ..core.world import world as current_world
from ..data import DataSplits
from ..kd.ensemble import EnsembleTeacher, checked_member, member_configs
from ..models import count_parameters
from ..models.checkpoints import checked_checkpoint, checked_model
from ..training.compute import Compute
from ..training.metrics import top5_entry
from .common import KDRun, log
from .teacher_cache import TeacherCache, teacher_recipe
from .train import run_train


def teacher_training_config(cfg: KDConfig, teacher: ModelConfig | None = None) -> TrainConfig:
    """The `distill train` config that kd uses when it has to train its teacher (or `teacher`, a member
    of teacher=ensemble): the run's recipe, with `teacher_epochs`, `teacher_lr` and `teacher_label_smoothing`."""
    teacher = teacher or cfg.teacher
    smoothing = cfg.teacher_label_smoothing
    return TrainConfig(
        optimizer=cfg.optimizer if cfg.teacher_lr is None else replace(cfg.optimizer, lr=cfg.teacher_lr),
        device=cfg.device,
        epochs=cfg.teacher_epochs,
        label_smoothing=cfg.label_smoothing if smoothing is None else smoothing,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        seed=cfg.seed,
        teacher_cache=cfg.teacher_cache,
        teacher=TeacherConfig(arch=teacher.arch, kwargs=dict(teacher.kwargs), name=teacher.name),
        # the teacher learns from the full training set; exclusions apply to the transfer set only
        dataset=replace(cfg.dataset, exclude_classes=[]),
        resume=cfg.resume,
        # TensorBoard in its own folder; MLflow keeps one run per job (the kd run, whose summary has the teacher's)
        logger=replace(cfg.logger, mlflow=False),
    )


def made_once(cfg: KDConfig, recipe: dict, folder: Path, label: str, make: Callable[[Path], object]) -> tuple[Path, str]:
    """The cached model of `recipe`, or `make(folder)` run once to train it into `folder`, whose best.pt
    is then published to the cache under `recipe`.

    Returns the checkpoint and where it came from ('cache' or 'trained'). Parallel sweep jobs wait on
    the recipe's lock while one of them trains; a resumed kd that had started training the model in
    `folder` finishes that training (as the run would have), even if another run cached one meanwhile.
    With several processes, rank 0 holds the lock, decides and publishes; all of them train.
    """
    world = current_world()
    cache = TeacherCache(cfg.teacher_cache)
    with cache.lock(recipe) if world.is_main else nullcontext():
        reused = world.on_main(lambda: _reusable(cfg, cache, recipe, folder, label))
        if reused is not None:
            return reused
        make(folder)
        # `make` may have published it itself (run_train does)
        return world.on_main(lambda: (cache.lookup(recipe) or cache.publish(recipe, folder / BEST), "trained"))


def _reusable(cfg: KDConfig, cache: TeacherCache, recipe: dict, folder: Path, label: str) -> tuple[Path, str] | None:
    """The cached model of `recipe` and its source, unless `folder` holds its unfinished training to resume."""
    started_here = cfg.resume and folder.is_dir()
    unfinished_here = started_here and run_status(folder) != "completed"
    cached = cache.lookup(recipe)
    if cached is not None and not unfinished_here:
        log.info(f"{label}: reusing cached {cached}")
        return cached, "trained" if started_here else "cache"
    if unfinished_here:
        log.info(f"{label}: resuming its training in {folder}")
    else:
        log.info(f"{label}: none cached for this recipe; training it into {folder}")
    return None


def trained_once(cfg: KDConfig, train_cfg: TrainConfig, folder: Path, label: str) -> tuple[Path, str]:
    """A model trained by `run_train(train_cfg)`: from the recipe cache, or trained into `folder` once
    (by every data-parallel process: a recipe of its own, see `teacher_recipe`)."""
    recipe = teacher_recipe(train_cfg, current_world().size)
    return made_once(cfg, recipe, folder, label, lambda into: run_train(train_cfg, into, label))


def _obtain_teacher(cfg: KDConfig, run_dir: Path) -> tuple[Path, str]:
    """The teacher checkpoint to use and where it came from: 'checkpoint', 'cache' or 'trained'."""
    if cfg.teacher.checkpoint is not None:
        return Path(cfg.teacher.checkpoint), "checkpoint"
    return trained_once(cfg, teacher_training_config(cfg), run_dir / "teacher", "teacher")


def baseline_training_config(cfg: KDConfig) -> TrainConfig:
    """The same student trained alone: cross-entropy on the same transfer set with the same recipe.

    That is exactly `distill train teacher=<student>` (and `distill kd alpha=0`), so it shares their cache.
    """
    return replace(
        teacher_training_config(cfg, cfg.student),
        epochs=cfg.epochs,
        dataset=cfg.dataset,
        optimizer=cfg.optimizer,
        label_smoothing=cfg.label_smoothing,
    )


def obtain_teacher(run: KDRun) -> tuple[nn.Module, dict]:
    """The frozen teacher (given, cached or trained once; or the ensemble of such members) and its summary entry."""
    cfg = run.cfg
    if cfg.teacher.arch == ENSEMBLE:
        return obtain_ensemble(run)
    path, source = _obtain_teacher(cfg, run.run_dir)
    teacher = load_frozen(path, cfg.teacher, "teacher", run.data, run.compute, run.compute.world)
    # rank 0 tests it; with several processes the others wait for the entry
    return teacher, run.compute.world.on_main(lambda: model_entry(run, teacher, cfg.teacher, path, source))


def load_frozen(path: Path, expected: ModelConfig, key: str, data: DataSplits, compute: Compute, world: World = SINGLE) -> nn.Module:
    """Rebuild a frozen model from its checkpoint on the device, checking it matches `key`'s architecture and
    the classes (with a distributed `world`, rank 0 reads the file and every rank gets the model)."""
    checkpoint = world.on_main(lambda: checked_checkpoint(path, expected, key, data.info))
    return compute.place(checked_model(checkpoint, expected, key, path, data.info)).eval().requires_grad_(False)


def model_entry(run: KDRun, model: nn.Module, model_cfg: ModelConfig, path: Path | None, source: str) -> dict:
    """The summary entry of a trained, frozen model: its test accuracy and which checkpoint it came from."""
    accuracy = run.evaluate(model)
    return {
        "name": model_cfg.label,
        "arch": model_cfg.arch,
        "params": count_parameters(model),
        "test_acc": accuracy.overall,
        "test_acc_per_class": dict(zip(run.data.info.class_names, accuracy.per_class)),
        **top5_entry(accuracy, "test_acc_top5"),
        "checkpoint": None if path is None else str(path.resolve()),
        "source": source,
    }


def baseline_entry(run: KDRun, student_cfg: ModelConfig, folder: Path) -> dict:
    """The same student trained alone (cached once per recipe, else trained into `folder`): its summary entry."""
    cfg = replace(run.cfg, student=student_cfg)
    path, source = trained_once(cfg, baseline_training_config(cfg), folder, "baseline")

    def entry() -> dict:  # rank 0's work: with several processes all of them trained it
        accuracy = run.evaluate(load_frozen(path, student_cfg, "student", run.data, run.compute))
        return {
            "name": student_cfg.label,
            "arch": student_cfg.arch,
            "test_acc_best": accuracy.overall,
            **top5_entry(accuracy, "test_acc_top5_best"),
            "checkpoint": str(path.resolve()),
            "source": source,
        }

    return run.compute.world.on_main(entry)


def obtain_ensemble(run: KDRun) -> tuple[EnsembleTeacher, dict]:
    """Each member obtained like a teacher (trained once into <run>/teacher<i>/ and cached, or its given
    checkpoint), the frozen ensemble, and its summary entry: the ensemble target's test accuracy, with
    each member's."""
    cfg, compute, data = run.cfg, run.compute, run.data
    members, entries = [], []
    weights = cfg.teacher.weights or [1.0] * (len(cfg.teacher.members) + len(cfg.teacher.checkpoints))
    for index, ((key, member, path), weight) in enumerate(zip(member_configs(cfg.teacher, compute.world), weights), 1):
        if path is None:
            train_cfg = teacher_training_config(cfg, member)
            path, source = trained_once(cfg, train_cfg, run.run_dir / f"teacher{index}", f"teacher {index}")
        else:
            source = "checkpoint"
        model = compute.place(checked_member(key, member, path, data, compute.world)).eval().requires_grad_(False)
        members.append(model)
        # rank 0 tests each member and the ensemble; with several processes the others wait for the entries
        entry = compute.world.on_main(lambda: model_entry(run, model, member, path, source))  # called here, in this iteration
        entries.append({**entry, "weight": weight / sum(weights)})
    ensemble = compute.place(EnsembleTeacher(members, weights, cfg.T)).eval()
    entry = compute.world.on_main(lambda: model_entry(run, ensemble, cfg.teacher, None, "members"))
    entry["name"] = "ensemble of " + " + ".join(member["name"] for member in entries)
    entry.update(params=count_parameters(ensemble), members=entries)
    return ensemble, entry
