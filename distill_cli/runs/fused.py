"""Fused kd runs: the jobs of a sweep that differ only in what changes neither the data nor the teacher
(T, alpha, `loss.*` weights, the student's optimizer) train in one process, on shared batches.

One loader iteration per step (one data order and augmentation), one teacher forward per batch (or its
cached logits), then each student's step with its own objective, optimizer, schedule and RNG stream
(`training.loop.fit_together`). Each job writes what `run_kd` writes into its own folder, with the same numbers.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from ..core.checkpoint import BEST
from ..core.config import KDConfig, to_plain
from ..core.console import log, logging_run, print_results
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..data import DataSplits
from ..kd.teachers import Shared
from ..kd.wiring import check_kd, student_from_checkpoint, student_shaped
from ..losses import LOSSES
from ..losses.base import build_method
from ..training.compute import Compute
from ..training.loop import Training, fit_together
from ..training.rng import rng_state, set_rng_state
from ..training.setup import Loaders, prepare_run
from ..training.stacked import StackedStudents, choose_batching
from ..training.trackers import open_trackers
from .common import KDRun, checkpoint_maker, fit_options, run_header, trained_result
from .memory import plan_fused
from .student import links, prepare_student, student_results
from .teacher_cache import teacher_recipe
from .teachers import teacher_training_config

# what a fused job may change: the objective's weights and the student's optimizer (and where it writes)
FUSABLE_KEYS = ("T", "alpha", "loss", "optimizer", "label_smoothing", "resume")


def group_key(cfg: KDConfig) -> str | None:
    """What must be equal for kd jobs to fuse (their configs without `FUSABLE_KEYS`, the method's name: it picks
    the teacher's feature points, and the recipe of the teacher kd trains: a group has one teacher), or None for a
    job that runs alone (a training mode, an export, a method with a stage before distillation)."""
    if cfg.mode != "single" or cfg.export or cfg.device.processes > 1 or LOSSES.get(cfg.loss["name"]).pretrains:
        return None
    kept = {key: value for key, value in to_plain(cfg).items() if key not in FUSABLE_KEYS}
    # the teacher's recipe takes the job's optimizer and label smoothing (teacher_lr, teacher_label_smoothing where
    # set): jobs that would train different teachers cannot share one teacher's outputs; a given checkpoint is in `kept`
    teacher = None if cfg.teacher.checkpoint is not None else teacher_recipe(teacher_training_config(cfg))
    return repr(sorted({**kept, "loss.name": cfg.loss["name"], "teacher.recipe": teacher}.items()))


def run_kd_fused(cfgs: list[KDConfig], run_dirs: list[Path], batching: str = "sequential", memory_gb: float | None = None) -> list[dict]:
    """Run the kd jobs `cfgs` (all of one `group_key`) fused, each into its run folder as `run_kd` would:
    metrics.jsonl, last.pt, best.pt, summary.json. Returns their summaries; a job that fails (a diverged
    student, a bad setting of its own) gets a failed summary with the one-line reason, and the others go on.
    `batching` (`stacked.BATCHING`): how the students' passes run, see `stacked.choose_batching`;
    "sequential" gives each job exactly the numbers of its run alone. Students that would not fit
    `memory_gb` GiB together (None: the memory free) train as consecutive sub-groups (`memory.plan_fused`),
    one after another, each on the batches the whole group would draw, sharing the data, the teacher and
    its cached logits."""
    keys = {group_key(cfg) for cfg in cfgs}
    if None in keys or len(keys) > 1:
        raise DistillError("run_kd_fused: the jobs differ in more than T, alpha, loss weights and the optimizer")
    start = time.perf_counter()
    cfgs = [student_from_checkpoint(cfg) for cfg in cfgs]
    summaries: list[dict | None] = [None] * len(cfgs)
    compute, data, loaders = prepare_run(cfgs[0])
    shared = Shared()
    shared.students = len(cfgs)  # they share the teacher's outputs (a teacher-view store pays sooner)
    first_epoch = loaders.train.state_dict()
    for positions in plan_fused(cfgs, compute, data, loaders, memory_gb):
        loaders.train.load_state_dict(first_epoch)
        group = [cfgs[n] for n in positions], [run_dirs[n] for n in positions]
        for position, summary in zip(positions, _train_fused(*group, compute, data, loaders, shared, start, batching)):
            summaries[position] = summary
    return summaries


def _train_fused(
    cfgs: list[KDConfig], run_dirs: list[Path], compute: Compute, data: DataSplits, loaders: Loaders, shared: Shared, start: float,
    batching: str,
) -> list[dict]:
    """Train the kd jobs `cfgs` fused on `loaders.train`'s batches from its current position (`run_kd_fused`
    after the run's preparation, shared with the other sub-groups), stacked or not as `batching` decides for
    them: their summaries, `wall_time_s` from `start`."""
    summaries: list[dict | None] = [None] * len(cfgs)
    with ExitStack() as stack:
        how, why = _group_batching(batching, cfgs[0], compute, data, loaders, len(cfgs))
        shared.stacked = StackedStudents() if how == "stacked" else None
        jobs, trainings, streams = [], [], []
        for index, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            with logging_run(run_dir):
                trackers = stack.enter_context(open_trackers(cfg, run_dir, "kd"))
                run = KDRun(cfg, run_dir, compute, data, loaders, trackers, shared)
                summary = run_header("kd", cfg, compute, data, loaders, run_dir)
                summary.update(mode="single", T=cfg.T, alpha=cfg.alpha, loss=dict(cfg.loss))
                try:
                    check_kd(links(cfg), data, compute, loaders.train.augment)
                    wired, teacher = prepare_student(run, summary)
                    make_checkpoint = checkpoint_maker(wired.student, cfg.student, cfg, data)
                    options = fit_options(
                        wired.student, wired.step, cfg, cfg.epochs, compute, data, loaders, run_dir, "student", trackers, make_checkpoint,
                        wired.objective,
                    )
                    trainings.append(Training(**options))
                except DistillError as error:
                    summaries[index] = _failed(cfg, run_dir, error)
                    continue
            streams.append(rng_state())  # the student's RNG stream, as its run alone starts training with it
            jobs.append((index, run, summary, wired, teacher))
        log.info(f"fused: {len(trainings)} students train on shared batches, {why}")
        errors = fit_together(trainings, loaders.train, streams, shared.stacked) if trainings else []
        for (index, run, summary, wired, teacher), training, error in zip(jobs, trainings, errors):
            with logging_run(run.run_dir):
                if error is not None:
                    summaries[index] = _failed(run.cfg, run.run_dir, error)
                    continue
                result = trained_result(wired.student, run.cfg.student, training.best, run.run_dir / BEST, compute, data, loaders)
                student_results(run, summary, result, wired.objective, teacher, wired.student)
                summary["wall_time_s"] = time.perf_counter() - start
                write_json_atomic(summary, run.run_dir / "summary.json")
                run.trackers.log_summary(summary)
                print_results(summary, per_class=run.cfg.per_class)
                summaries[index] = summary
    return summaries


def _group_batching(batching: str, cfg: KDConfig, compute, data, loaders, count: int) -> tuple[str, str]:
    """`stacked.choose_batching` for `count` students of `cfg`, measured with throwaway students on one
    batch of training images; the global RNG states are left as they were (the jobs' streams start there)."""
    if batching == "sequential":
        return choose_batching(batching, [], (), None, compute)
    state = rng_state()
    try:
        students = [student_shaped(cfg.student, data, compute) for _ in range(count)]
        images = next(iter(loaders.eval_loader(data.train))).images[: cfg.batch_size]
        return choose_batching(batching, students, build_method(dict(cfg.loss)).student_points, images, compute)
    finally:
        set_rng_state(state)


def _failed(cfg: KDConfig, run_dir: Path, error: DistillError) -> dict:
    """Record a failed job's summary (as `distill` records a job that failed alone) and log it."""
    summary = {"command": "kd", "status": "failed", "error": str(error), "config": to_plain(cfg)}
    log.error(f"{run_dir}: {error}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, run_dir / "summary.json")
    return summary
