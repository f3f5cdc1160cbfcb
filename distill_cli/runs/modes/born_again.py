"""Born-again networks (`generations=N`, Furlanello et al. 2018): generation 1 is the usual kd student;
generation k is the same architecture again, taught by generation k-1's best.pt, with the same method.

Each generation is a kd run of its own in `<run>/gen<k>/` (generation 1 brings the teacher and the
student-alone baseline); with several processes (`device.processes`) all of them train every generation.
`distill resume` keeps the generations that completed and continues the one that was stopped. The summary
has a row per generation and the test accuracy of the ensemble of all generations (their averaged
probabilities).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...core.config import KDConfig, TeacherConfig
from ...core.errors import DistillError
from ...core.run_folders import read_summary, run_status
from ...kd.ensemble import EnsembleTeacher
from ...kd.objective import needs_teacher
from ...kd.wiring import Link
from ..common import KDRun
from ..teachers import load_frozen


def generation_config(cfg: KDConfig, previous: str | None) -> KDConfig:
    """The kd config of one generation: the run's with one generation; taught by the checkpoint `previous`
    (the generation before, the same architecture as the student) unless it is generation 1."""
    one = replace(cfg, generations=1, export=None, logger=replace(cfg.logger, mlflow=False))
    if previous is None:
        return one
    student = cfg.student
    teacher = TeacherConfig(arch=student.arch, kwargs=dict(student.kwargs), name=student.name, checkpoint=previous)
    return replace(one, teacher=teacher, baseline=False)


def links(cfg: KDConfig) -> list[Link]:
    """Generation 1 (the plain kd run), then the student taught by a network of its own architecture."""
    if not needs_teacher(cfg):
        raise DistillError("generations: born-again students learn from the generation before, but loss=kd alpha=0 uses no teacher")
    later = generation_config(cfg, "the generation before")
    own_architecture = replace(later, teacher=replace(later.teacher, checkpoint=None))
    return [Link(generation_config(cfg, None)), Link(own_architecture, teacher="student")]


def born_again(run: KDRun, summary: dict) -> None:
    """Train generations 1..N into `<run>/gen<k>/`; fills `summary` with the first generation's teacher and
    baseline, the last generation as the student, a row per generation and their ensemble's accuracy."""
    cfg, world = run.cfg, run.compute.world
    rows, previous = [], None
    for generation in range(1, cfg.generations + 1):
        folder = run.run_dir / f"gen{generation}"
        # with several processes every rank trains each generation; rank 0 reads or writes its summary
        if cfg.resume and world.on_main(lambda folder=folder: run_status(folder) == "completed"):
            result = world.on_main(lambda folder=folder: read_summary(folder))
        else:
            result = world.broadcast(run.nested(generation_config(cfg, previous), folder))
        if generation == 1:  # every generation has the student's architecture: its speed-up is generation 1's
            summary.update(teacher=result["teacher"], baseline=result.get("baseline"), speedup=result.get("speedup"))
        teacher = result["teacher"]
        rows.append({"generation": generation, **result["student"], "teacher": {k: teacher[k] for k in ("name", "test_acc", "checkpoint")}})
        previous = result["student"]["checkpoint"]
    summary.update(generations=rows, student=rows[-1], generations_ensemble=_ensemble_accuracy(run, [Path(row["checkpoint"]) for row in rows]))
    if summary.get("baseline"):
        summary["kd_gain"] = rows[-1]["test_acc_best"] - summary["baseline"]["test_acc_best"]
    teacher = summary["teacher"]
    summary["compression"] = teacher["params"] / rows[-1]["params"]


def _ensemble_accuracy(run: KDRun, checkpoints: list[Path]) -> dict:
    """Test accuracy of the generations' averaged probabilities (temperature 1)."""
    world = run.compute.world
    members = [load_frozen(path, run.cfg.student, "student", run.data, run.compute, world) for path in checkpoints]
    ensemble = run.compute.place(EnsembleTeacher(members)).eval()
    accuracy = world.on_main(lambda: run.evaluate(ensemble))
    return {"members": len(members), "test_acc": accuracy.overall, "test_acc_per_class": dict(zip(run.data.info.class_names, accuracy.per_class))}
