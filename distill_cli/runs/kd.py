"""`distill kd` as a plain function: `run_kd(cfg, run_dir)` distils a student from a teacher in the mode the
config asks for (`runs/modes/`), after one check of everything it will wire, and writes the run's summary."""

from __future__ import annotations

import time
from pathlib import Path

from ..core.config import KDConfig
from ..core.console import print_results
from ..core.files import write_json_atomic
from ..core.run_folders import keep_obtained
from ..data import DataSplits
from ..kd.wiring import check_kd, student_from_checkpoint
from ..models.checkpoints import model_from_checkpoint
from ..ship.evaluate import first_images
from ..ship.export import CHECK_IMAGES, FORMATS, check_format, describe, export_checked
from ..ship.programs import program_record
from ..training.setup import Loaders, prepare_run
from ..training.trackers import open_trackers
from .common import KDRun, log, run_header
from .modes import MODES


def run_kd(cfg: KDConfig, run_dir: Path) -> dict:
    """Distil `cfg.student` from a teacher (given, cached or trained once) with the method `cfg.loss`;
    `loss=kd alpha=0` trains the student alone. `peers`, `generations` and `assistants` pick the other
    training modes (`runs/modes/`). Every network and method the mode wires is built once, untrained,
    before anything trains (`kd.wiring.check_kd`)."""
    start = time.perf_counter()
    cfg = student_from_checkpoint(cfg)
    if cfg.export:
        check_format(cfg.export)  # missing packages fail now, not after training
    mode = MODES[cfg.mode]
    with open_trackers(cfg, run_dir, "kd") as trackers:
        compute, data, loaders = prepare_run(cfg)
        summary = run_header("kd", cfg, compute, data, loaders, run_dir)
        summary.update(mode=cfg.mode, T=cfg.T, alpha=cfg.alpha, loss=dict(cfg.loss))
        check_kd(mode.links(cfg), data, compute, loaders.train.augment)
        try:
            mode.train(KDRun(cfg, run_dir, compute, data, loaders, trackers, nested=run_kd), summary)
        except BaseException as error:  # the failed (or interrupted) run's summary keeps the teacher and baseline trained
            keep_obtained(error, summary)
            raise
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
    model, _ = model_from_checkpoint(best, data.info)
    images = first_images(loaders.test, CHECK_IMAGES)
    result = export_checked(model, images, fmt, best.with_suffix(FORMATS[fmt]), atol=1e-4, record=program_record(best, model, "fp32"))
    log.info(f"exported {describe(result)}")
    return result
