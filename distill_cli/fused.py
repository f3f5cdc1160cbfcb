"""Fused kd runs: the jobs of a sweep that differ only in what changes neither the data nor the teacher
(T, alpha, `loss.*` weights, the student's optimizer) train in one process, on shared batches.

One loader iteration per step (one data order and augmentation), one teacher forward per batch (or its
cached logits), then each student's step with its own objective, optimizer, schedule and RNG stream
(`engine.fit_together`). Each job writes what `run_kd` writes into its own folder, with the same numbers.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from .config import KDConfig, to_plain
from .engine import Training, fit_together, rng_state
from .errors import DistillError
from .files import write_json_atomic
from .modes import kd_mode
from .report import log
from .tasks import (
    KDRun,
    Shared,
    _run_header,
    checkpoint_maker,
    fit_options,
    prepare_run,
    prepare_student,
    print_results,
    student_results,
    trained_result,
)
from .checkpoint import BEST
from .trackers import open_trackers

# what a fused job may change: the objective's weights and the student's optimizer (and where it writes)
FUSABLE_KEYS = ("T", "alpha", "loss", "optimizer", "resume")


def group_key(cfg: KDConfig) -> str | None:
    """What must be equal for kd jobs to fuse (their configs without `FUSABLE_KEYS`, and the method's name:
    it picks the teacher's feature points), or None for a job that runs alone (a training mode, an export)."""
    if kd_mode(cfg)[0] != "single" or cfg.export or cfg.device.processes > 1:
        return None
    kept = {key: value for key, value in to_plain(cfg).items() if key not in FUSABLE_KEYS}
    return repr(sorted({**kept, "loss.name": cfg.loss["name"]}.items()))


def run_kd_fused(cfgs: list[KDConfig], run_dirs: list[Path]) -> list[dict]:
    """Run the kd jobs `cfgs` (all of one `group_key`) fused, each into its run folder as `run_kd` would:
    metrics.jsonl, last.pt, best.pt, summary.json. Returns their summaries; a job that fails (a diverged
    student, a bad setting of its own) gets a failed summary with the one-line reason, and the others go on."""
    keys = {group_key(cfg) for cfg in cfgs}
    if None in keys or len(keys) > 1:
        raise DistillError("run_kd_fused: the jobs differ in more than T, alpha, loss weights and the optimizer")
    start = time.perf_counter()
    summaries: list[dict | None] = [None] * len(cfgs)
    with ExitStack() as stack:
        compute, data, loaders = prepare_run(cfgs[0])
        shared = Shared()
        jobs, trainings, streams = [], [], []
        for index, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            trackers = stack.enter_context(open_trackers(cfg, run_dir, "kd"))
            run = KDRun(cfg, run_dir, compute, data, loaders, trackers, shared)
            summary = _run_header("kd", cfg, compute, data, loaders, run_dir)
            summary.update(mode="single", T=cfg.T, alpha=cfg.alpha, loss=dict(cfg.loss))
            try:
                student, objective, step, teacher = prepare_student(run, summary)
                make_checkpoint = checkpoint_maker(student, cfg.student, cfg, data)
                options = fit_options(student, step, cfg, cfg.epochs, compute, data, loaders, run_dir, "student", trackers, make_checkpoint, objective)
                trainings.append(Training(**options))
            except DistillError as error:
                summaries[index] = _failed(cfg, run_dir, error)
                continue
            streams.append(rng_state())  # the student's RNG stream, as its run alone starts training with it
            jobs.append((index, run, summary, student, objective, teacher))
        log.info(f"fused: {len(trainings)} students train on shared batches")
        errors = fit_together(trainings, loaders.train, streams) if trainings else []
        for (index, run, summary, student, objective, teacher), training, error in zip(jobs, trainings, errors):
            if error is not None:
                summaries[index] = _failed(run.cfg, run.run_dir, error)
                continue
            result = trained_result(student, run.cfg.student, training.best, run.run_dir / BEST, compute, data, loaders)
            student_results(run, summary, result, objective, teacher, student)
            summary["wall_time_s"] = time.perf_counter() - start
            write_json_atomic(summary, run.run_dir / "summary.json")
            run.trackers.log_summary(summary)
            print_results(summary, per_class=run.cfg.per_class)
            summaries[index] = summary
    return summaries


def _failed(cfg: KDConfig, run_dir: Path, error: DistillError) -> dict:
    """Record a failed job's summary (as `distill` records a job that failed alone) and log it."""
    summary = {"command": "kd", "status": "failed", "error": str(error), "config": to_plain(cfg)}
    log.error(f"{run_dir}: {error}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, run_dir / "summary.json")
    return summary
