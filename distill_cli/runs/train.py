"""`distill train` as a plain function: `run_train(cfg, run_dir)` trains a teacher with cross-entropy into the
run folder and publishes it to the teacher cache (kd trains its teachers and its baseline through here).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.checkpoint import (
    BEST,
)
from ..core.config import (
    ENSEMBLE,
    TrainConfig,
)
from ..core.console import print_results
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..models import build_model
from ..training.loop import cross_entropy_step
from ..training.rng import seed_everything
from ..training.setup import prepare_run
from ..training.trackers import open_trackers
from .common import run_header, train_network
from .teacher_cache import TeacherCache, teacher_recipe


def run_train(cfg: TrainConfig, run_dir: Path, label: str = "teacher") -> dict:
    """Train `cfg.teacher` with cross-entropy and publish it to the teacher cache; `label` names the
    network in progress lines (kd trains its student-alone baseline through here as "baseline")."""
    start = time.perf_counter()
    if cfg.teacher.checkpoint is not None or cfg.teacher.arch == ENSEMBLE:
        key = "teacher.checkpoint" if cfg.teacher.checkpoint is not None else "teacher=ensemble"
        raise DistillError(f"{key} is for `distill kd`; `distill train` trains one teacher from scratch")
    with open_trackers(cfg, run_dir, "train") as trackers:
        compute, data, loaders = prepare_run(cfg)
        summary = run_header("train", cfg, compute, data, loaders, run_dir)
        seed_everything(cfg.seed)
        model = compute.place(build_model(cfg.teacher, data.info, "teacher"))
        step = cross_entropy_step(compute.forward(model, trained=True), cfg.label_smoothing)
        teacher = train_network(model, cfg.teacher, step, cfg, cfg.epochs, compute, data, loaders, run_dir, label, trackers)
        if teacher is None:  # not rank 0
            return None
        cached = TeacherCache(cfg.teacher_cache).publish(teacher_recipe(cfg, compute.world.size), run_dir / BEST)
        # `teacher` holds the trained network's results whatever it was trained as; `role` says what that was
        summary.update(role=label, teacher=teacher, teacher_cache=str(cached), wall_time_s=time.perf_counter() - start)
        write_json_atomic(summary, run_dir / "summary.json")
        trackers.log_summary(summary)
        print_results(summary, per_class=cfg.per_class)
        return summary
