"""The commands as plain functions: `run_train(cfg, run_dir)` and `run_kd(cfg, run_dir)`.

They take validated config dataclasses and a run folder, so tests can call them without Hydra.
Each writes metrics.jsonl, last.pt, best.pt and summary.json into its run folder and returns the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from .checkpoint import BEST, load_checkpoint, load_resume_checkpoint, model_checkpoint
from .files import write_json_atomic
from .config import ENSEMBLE, KDConfig, ModelConfig, RunConfig, TeacherConfig, TrainConfig, to_plain
from .data import DataSplits, load_dataset, training_augment
from .data.loader import Loader, build_loader, choose_pipeline
from .distributed import SINGLE, World, world as current_world
from .engine import (
    Compute,
    build_optimizer,
    build_scheduler,
    cross_entropy_step,
    FitResult,
    evaluate,
    fit,
    inference_rate,
    resolve_compute,
    seed_everything,
    teacher_logits,
)
from .errors import DistillError
from .kd import build_objective, check_cache_teacher, kd_step, needs_teacher
from .models import build_model, count_parameters, model_arguments
from .report import print_results
from .runs import run_status
from .teacher_cache import TeacherCache, teacher_recipe
from .trackers import Trackers, open_trackers

log = logging.getLogger("distill")


@dataclass
class Loaders:
    train: Loader
    val: Loader | None
    test: Loader
    eval_loader: Callable[[object], Loader]  # an unshuffled, unaugmented loader over any split of the run
    pipeline: str  # device | stream


def prepare_run(cfg: RunConfig) -> tuple[Compute, DataSplits, Loaders]:
    """Resolve device, precision and kernels, load the data and build the run's loaders (device or stream pipeline)."""
    world = current_world()
    compute = resolve_compute(cfg.device, world)
    data = load_dataset(cfg.dataset)
    if cfg.batch_size * world.size > len(data.train):
        processes = f" x {world.size} processes" if world.size > 1 else ""
        raise DistillError(f"batch_size={cfg.batch_size}{processes} is larger than the training split ({len(data.train)} images)")
    pipeline = choose_pipeline(cfg.dataset, [data.train, data.val, data.test], compute.device)
    # batches come in channels_last unless it is off: most conv nets use it (see Compute.uses_channels_last)
    options = {"workers": cfg.dataset.workers, "dtype": compute.input_dtype, "channels_last": compute.channels_last is not False}

    def eval_loader(split) -> Loader:
        return build_loader(pipeline, split, data.info, cfg.eval_batch_size, compute.device, **options)

    train = build_loader(
        pipeline,
        data.train,
        data.info,
        cfg.batch_size,
        compute.device,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
        augment=training_augment(cfg.dataset, data.info),
        shard=(world.rank, world.size),
        **options,
    )
    val = eval_loader(data.val) if len(data.val) else None
    return compute, data, Loaders(train, val, eval_loader(data.test), eval_loader, pipeline)


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
    go to `fit` as they are."""
    trained = model if method is None else nn.ModuleList([model, method])
    optimizer = build_optimizer(trained, cfg.optimizer, compute.device)
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
        **fit_options,
    )


def fit_network(*args, **options) -> FitResult:
    """`fit` with `fit_options(*args, **options)`."""
    return fit(**fit_options(*args, **options))


def checkpoint_maker(model: nn.Module, model_cfg: ModelConfig, cfg: RunConfig, data: DataSplits) -> Callable[[dict], dict]:
    """`make_checkpoint` for `fit`: `model`'s weights, what rebuilds it, and the run's config."""
    config = to_plain(cfg)

    def make_checkpoint(state: dict) -> dict:
        return model_checkpoint(
            model, model_cfg.arch, model_cfg.kwargs, data.info.num_classes, dataset=data.info.name, config=config, **state
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
        "best_epoch": result.best_epoch,
        "val_acc_best": result.best_val_acc,
        "selection": result.selection,
        "checkpoint": str(best_path),
    }


def _train_network(
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


def _run_header(command: str, cfg: RunConfig, compute: Compute, data: DataSplits, loaders: Loaders, run_dir: Path) -> dict:
    log.info(
        f"distill {command}: {data.info.name} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)}) "
        f"on {compute.device} {compute.precision}, {loaders.pipeline} pipeline -> {run_dir}"
    )
    return {
        "command": command,
        "status": "completed",
        "dataset": data.info.name,
        "device": str(compute.device),
        "precision": compute.precision,
        "pipeline": loaders.pipeline,
        "processes": compute.world.size,  # data-parallel; a step's batch is batch_size x processes
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "exclude_classes": list(cfg.dataset.exclude_classes),
        "data": _data_facts(data),
        "run_dir": str(run_dir),
    }


def run_train(cfg: TrainConfig, run_dir: Path, label: str = "teacher") -> dict:
    """Train `cfg.teacher` with cross-entropy and publish it to the teacher cache; `label` names the
    network in progress lines (kd trains its student-alone baseline through here as "baseline")."""
    start = time.perf_counter()
    if cfg.teacher.checkpoint is not None or cfg.teacher.arch == ENSEMBLE:
        key = "teacher.checkpoint" if cfg.teacher.checkpoint is not None else "teacher=ensemble"
        raise DistillError(f"{key} is for `distill kd`; `distill train` trains one teacher from scratch")
    with open_trackers(cfg, run_dir, "train") as trackers:
        compute, data, loaders = prepare_run(cfg)
        summary = _run_header("train", cfg, compute, data, loaders, run_dir)
        seed_everything(cfg.seed)
        model = compute.place(build_model(cfg.teacher, data.info, "teacher"))
        step = cross_entropy_step(compute.forward(model, trained=True))
        teacher = _train_network(model, cfg.teacher, step, cfg, cfg.epochs, compute, data, loaders, run_dir, label, trackers)
        if teacher is None:  # not rank 0
            return None
        cached = TeacherCache(cfg.teacher_cache).publish(teacher_recipe(cfg, compute.world.size), run_dir / BEST)
        summary.update(teacher=teacher, teacher_cache=str(cached), wall_time_s=time.perf_counter() - start)
        write_json_atomic(summary, run_dir / "summary.json")
        trackers.log_summary(summary)
        print_results(summary, per_class=cfg.per_class)
        return summary


def teacher_training_config(cfg: KDConfig, teacher: ModelConfig | None = None) -> TrainConfig:
    """The `distill train` config that kd uses when it has to train its teacher (or `teacher`, a member
    of teacher=ensemble)."""
    teacher = teacher or cfg.teacher
    return TrainConfig(
        optimizer=cfg.optimizer,
        device=cfg.device,
        epochs=cfg.teacher_epochs,
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


def _trained_once(cfg: KDConfig, train_cfg: TrainConfig, folder: Path, label: str) -> tuple[Path, str]:
    """A model trained by `run_train(train_cfg)`: from the recipe cache, or trained into `folder` once
    (by every data-parallel process: a recipe of its own, see `teacher_recipe`)."""
    recipe = teacher_recipe(train_cfg, current_world().size)
    return made_once(cfg, recipe, folder, label, lambda into: run_train(train_cfg, into, label))


def _obtain_teacher(cfg: KDConfig, run_dir: Path) -> tuple[Path, str]:
    """The teacher checkpoint to use and where it came from: 'checkpoint', 'cache' or 'trained'."""
    if cfg.teacher.checkpoint is not None:
        return Path(cfg.teacher.checkpoint), "checkpoint"
    return _trained_once(cfg, teacher_training_config(cfg), run_dir / "teacher", "teacher")


def baseline_training_config(cfg: KDConfig) -> TrainConfig:
    """The same student trained alone: cross-entropy on the same transfer set with the same recipe.

    That is exactly `distill train teacher=<student>` (and `distill kd alpha=0`), so it shares their cache.
    """
    return replace(teacher_training_config(cfg, cfg.student), epochs=cfg.epochs, dataset=cfg.dataset)


def _checked_checkpoint(path: Path, expected: ModelConfig, key: str, data: DataSplits) -> dict:
    """The checkpoint at `path`, refused unless it holds `key`'s architecture with the same arguments and
    the dataset's class count."""
    checkpoint = load_checkpoint(path)
    same_network = checkpoint["arch"] == expected.arch and model_arguments(
        expected.arch, checkpoint["kwargs"]
    ) == model_arguments(expected.arch, expected.kwargs)
    if not same_network:
        raise DistillError(
            f"{key}.checkpoint {path} holds {_describe(checkpoint['arch'], checkpoint['kwargs'])} but {key}= is "
            f"{_describe(expected.arch, expected.kwargs)}; choose the {key} config the checkpoint was trained with"
        )
    if checkpoint["num_classes"] != data.info.num_classes:
        raise DistillError(
            f"{key}.checkpoint {path} predicts {checkpoint['num_classes']} classes but dataset "
            f"{data.info.name} has {data.info.num_classes}"
        )
    return checkpoint


def _describe(arch: str, kwargs: dict) -> str:
    return f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"


def _load_model(path: Path, expected: ModelConfig, key: str, data: DataSplits, compute: Compute, world: World = SINGLE) -> nn.Module:
    """Rebuild a frozen model from its checkpoint, checking it matches `key`'s architecture and the classes
    (with a distributed `world`, rank 0 reads the file and every rank gets the model)."""
    checkpoint = world.on_main(lambda: _checked_checkpoint(path, expected, key, data))
    model = build_model(expected, data.info, key)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise DistillError(f"{key} checkpoint {path} does not fit {key}={expected.arch}: {first}") from None
    return compute.place(model).eval().requires_grad_(False)


class Shared:
    """Work that kd runs on the same data with the same teacher do once for all (a fused group's jobs share
    one; a run alone has its own): results by key, made on first use."""

    def __init__(self):
        self.results: dict = {}
        self.stacked = None  # a stacked.StackedStudents: the students' forward passes run as one

    def once(self, key, make: Callable[[], object]):
        """The result of `key`, made by `make()` the first time it is asked for."""
        if key not in self.results:
            self.results[key] = make()
        return self.results[key]


def once_per_batch(forward: Callable) -> Callable:
    """`forward` that runs once per batch: called again with the same images tensor (the next student's
    step on the same batch), it returns the outputs it computed for them."""
    last: dict = {}

    def shared_forward(images):
        if last.get("images") is not images:
            last.update(images=images, outputs=forward(images))
        return last["outputs"]

    return shared_forward


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

    def evaluate(self, model: nn.Module):
        """`model`'s test accuracy (overall and per class)."""
        return evaluate(model, self.loaders.test, self.compute, self.data.info.num_classes)


def untrained_teacher(cfg: KDConfig, compute: Compute, data: DataSplits) -> nn.Module:
    """The teacher's network as built before training (for a given checkpoint: checked against its
    metadata), to check a config before anything trains."""
    if cfg.teacher.arch == ENSEMBLE:
        from .modes.ensemble import untrained_ensemble

        return untrained_ensemble(cfg, compute, data)
    if cfg.teacher.checkpoint is not None:
        compute.world.on_main(lambda: _checked_checkpoint(Path(cfg.teacher.checkpoint), cfg.teacher, "teacher", data) and None)
    return compute.place(build_model(cfg.teacher, data.info, "teacher"))


def _check_before_training(cfg: KDConfig, compute: Compute, data: DataSplits, loaders: Loaders) -> tuple[bool, bool]:
    """Build every network and trainable part of the run once (untrained) so that a bad config fails
    before anything trains: the student (also the baseline's architecture), the teacher (or the given
    checkpoint's metadata) and the method with the feature points it reads. Returns whether the
    objective needs a teacher and whether its logits are cached."""
    student = compute.place(build_model(cfg.student, data.info, "student"))
    teacher = untrained_teacher(cfg, compute, data) if needs_teacher(cfg) else None
    objective, _, _ = build_objective(cfg, data, compute, student, teacher)
    return teacher is not None, check_cache_teacher(cfg, objective, loaders.train.augment is not None)


def obtain_teacher(run: KDRun) -> tuple[nn.Module, dict]:
    """The frozen teacher (given, cached or trained once; or the ensemble of such members) and its summary entry."""
    cfg = run.cfg
    if cfg.teacher.arch == ENSEMBLE:
        from .modes.ensemble import obtain_ensemble

        return obtain_ensemble(run)
    path, source = _obtain_teacher(cfg, run.run_dir)
    teacher = _load_model(path, cfg.teacher, "teacher", run.data, run.compute, run.compute.world)
    # rank 0 tests it; with several processes the others wait for the entry
    return teacher, run.compute.world.on_main(lambda: model_entry(run, teacher, cfg.teacher, path, source))


def model_entry(run: KDRun, model: nn.Module, model_cfg: ModelConfig, path: Path | None, source: str) -> dict:
    """The summary entry of a trained, frozen model: its test accuracy and which checkpoint it came from."""
    accuracy = run.evaluate(model)
    return {
        "name": model_cfg.label,
        "arch": model_cfg.arch,
        "params": count_parameters(model),
        "test_acc": accuracy.overall,
        "test_acc_per_class": dict(zip(run.data.info.class_names, accuracy.per_class)),
        "checkpoint": None if path is None else str(path.resolve()),
        "source": source,
    }


def baseline_entry(run: KDRun, student_cfg: ModelConfig, folder: Path) -> dict:
    """The same student trained alone (cached once per recipe, else trained into `folder`): its summary entry."""
    cfg = replace(run.cfg, student=student_cfg)
    path, source = _trained_once(cfg, baseline_training_config(cfg), folder, "baseline")

    def entry() -> dict:  # rank 0's work: with several processes all of them trained it
        baseline = _load_model(path, student_cfg, "student", run.data, run.compute)
        return {
            "name": student_cfg.label,
            "arch": student_cfg.arch,
            "test_acc_best": run.evaluate(baseline).overall,
            "checkpoint": str(path.resolve()),
            "source": source,
        }

    return run.compute.world.on_main(entry)


def distil(run: KDRun, summary: dict) -> None:
    """One student from one teacher (or an ensemble of teachers) with the method `cfg.loss`, into the run
    folder; fills `summary` with teacher, baseline, student, KD gain, compression and speed-up."""
    cfg = run.cfg
    student, objective, step, teacher = prepare_student(run, summary)
    student_result = _train_network(
        student, cfg.student, step, cfg, cfg.epochs, run.compute, run.data, run.loaders, run.run_dir, "student", run.trackers,
        method=objective,
    )
    if student_result is None:  # not rank 0: its part is done
        return
    student_results(run, summary, student_result, objective, teacher, student)


def prepare_student(run: KDRun, summary: dict) -> tuple[nn.Module, nn.Module, object, nn.Module | None]:
    """Everything `distil` needs before the student trains: the config checked, the teacher (and the
    baseline) obtained into `summary`, the teacher's logits cached where exact, and the student and its
    objective built from the run's seed. Returns (student, objective, training step, teacher or None).
    The teacher's logits table and its forward pass (once per batch) come from `run.shared`."""
    cfg, compute, data, loaders = run.cfg, run.compute, run.data, run.loaders
    with_teacher, cache_logits = _check_before_training(cfg, compute, data, loaders)
    teacher = None
    summary["teacher"] = None  # the student alone (loss=kd alpha=0) builds no teacher
    if with_teacher:
        teacher, summary["teacher"] = obtain_teacher(run)
        if cfg.baseline:
            summary["baseline"] = baseline_entry(run, cfg.student, run.run_dir / "baseline")
    cached_logits = None
    if cache_logits:
        cached_logits = run.shared.once(
            "teacher_logits", lambda: teacher_logits(teacher, loaders.eval_loader(data.train), compute, data.info.num_classes)
        )
        log.info(f"teacher: logits of the {len(data.train)} transfer images cached; kd steps skip the teacher")
    summary["teacher_logits_cached"] = cached_logits is not None
    seed_everything(cfg.seed)
    student = compute.place(build_model(cfg.student, data.info, "student"))
    objective, student_forward, teacher_forward = build_objective(cfg, data, compute, student, teacher)
    if teacher_forward is not None:
        key = ("teacher_forward", objective.method.teacher_points)
        teacher_forward = run.shared.once(key, lambda: once_per_batch(teacher_forward))
    if run.shared.stacked is not None:
        student_forward = run.shared.stacked.add(student)
    step = kd_step(student_forward, None if cached_logits is not None else teacher_forward, objective, cached_logits)
    return student, objective, step, teacher


def student_results(run: KDRun, summary: dict, result: dict, objective: nn.Module, teacher: nn.Module | None, student: nn.Module) -> None:
    """Fill `summary` with the trained student's entry `result`, its gain over the baseline and, with a
    teacher, compression and speed-up."""
    result["method_params"] = count_parameters(objective)
    summary["student"] = result
    if summary.get("baseline"):
        # what KD bought: the distilled student against the same student trained alone
        summary["kd_gain"] = result["test_acc_best"] - summary["baseline"]["test_acc_best"]
    if teacher is not None:
        compare_with_teacher(run, summary, teacher, student)


def compare_with_teacher(run: KDRun, summary: dict, teacher: nn.Module, student: nn.Module) -> None:
    """Compression (teacher / student parameters) and how much faster the product is: forward images/s
    on the test split, same device and precision (the teacher's measured once for the runs sharing it)."""
    compute, test = run.compute, run.loaders.test
    summary["compression"] = summary["teacher"]["params"] / summary["student"]["params"]
    summary["teacher"]["inference_images_per_s"] = run.shared.once("teacher_rate", lambda: inference_rate(teacher, test, compute))
    summary["student"]["inference_images_per_s"] = inference_rate(student, test, compute)
    summary["speedup"] = summary["student"]["inference_images_per_s"] / summary["teacher"]["inference_images_per_s"]


def run_kd(cfg: KDConfig, run_dir: Path) -> dict:
    """Distil `cfg.student` from a teacher (given, cached or trained once) with the method `cfg.loss`;
    `loss=kd alpha=0` trains the student alone. `peers`, `generations` and `assistants` pick the other
    training modes (`distill_cli/modes/`)."""
    from .modes import kd_mode  # the modes are built on this module's functions

    start = time.perf_counter()
    if cfg.export:
        from .export import check_format

        check_format(cfg.export)  # missing packages fail now, not after training
    with open_trackers(cfg, run_dir, "kd") as trackers:
        compute, data, loaders = prepare_run(cfg)
        summary = _run_header("kd", cfg, compute, data, loaders, run_dir)
        mode, train = kd_mode(cfg)
        summary.update(mode=mode, T=cfg.T, alpha=cfg.alpha, loss=dict(cfg.loss))
        train(KDRun(cfg, run_dir, compute, data, loaders, trackers), summary)
        if not compute.world.is_main:  # rank 0 reports for every process
            return None
        if cfg.export:
            summary["export"] = _export_student(cfg.export, Path(summary["student"]["checkpoint"]), data, loaders)
        summary["wall_time_s"] = time.perf_counter() - start
        write_json_atomic(summary, run_dir / "summary.json")
        trackers.log_summary(summary)
        print_results(summary, per_class=cfg.per_class)
        return summary


def _export_student(fmt: str, best: Path, data: DataSplits, loaders: Loaders) -> dict:
    """`export=onnx|pt2`: the student's best.pt as best.onnx / best.pt2 beside it, checked against PyTorch (`distill export`)."""
    from .evaluate import first_images, load_model
    from .export import CHECK_IMAGES, FORMATS, describe, export_checked

    model, _ = load_model(best, data.info)
    result = export_checked(model, first_images(loaders.test, CHECK_IMAGES), fmt, best.with_suffix(FORMATS[fmt]), atol=1e-4)
    log.info(f"exported {describe(result)}")
    return result


COMMANDS = {"train": run_train, "kd": run_kd}
