"""The plain kd mode: one student distilled from one teacher (or an ensemble of teachers) into the run
folder, with what it is compared against: the teacher, the same student trained alone (the baseline),
compression and speed-up. A fused group's jobs each run `prepare_student` and `student_results` too.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..kd.teachers import CACHED, LIVE, NONE, VIEWS, teacher_supply
from ..kd.wiring import KDWiring, Link, copies_teacher, wire_kd
from ..models import count_parameters
from ..ship.evaluate import Timing, first_images, throughputs
from .common import KDRun, checkpoint_maker, fit_network, log, train_network
from .teacher_views import teacher_view_store
from .teachers import baseline_entry, obtain_teacher


def links(cfg) -> list[Link]:
    """What the plain mode wires: the student taught by the run's teacher."""
    return [Link(cfg)]


def distil(run: KDRun, summary: dict) -> nn.Module | None:
    """One student from one teacher (or an ensemble of teachers) with the method `cfg.loss`, into the run
    folder; fills `summary` with teacher, baseline, student, KD gain, compression and speed-up. Returns the
    trained student (None on a data-parallel rank other than 0)."""
    cfg = run.cfg
    wired, teacher = prepare_student(run, summary)
    if wired.stage is not None:
        summary["pretrain"] = pretrain(run, wired)
    student_result = train_network(
        wired.student, cfg.student, wired.step, cfg, cfg.epochs, run.compute, run.data, run.loaders, run.run_dir, "student",
        run.trackers, method=wired.objective,
    )
    if student_result is None:  # not rank 0: its part is done
        return None
    student_results(run, summary, student_result, wired.objective, teacher, wired.student)
    return wired.student


# where a method's stage before distillation trains, inside the run folder
PRETRAIN = "pretrain"


def pretrain(run: KDRun, wired: KDWiring) -> dict:
    """The method's stage before distillation (`wired.stage`: FT's paraphraser, AB's connectors and student)
    trained into <run>/pretrain by the run's training loop: metrics.jsonl and last.pt (the student and, as for
    distillation, the method's state; no best.pt: nothing is validated), the run's optimizer at the stage's
    learning rate (constant, or stepped down at its milestones). `resume=true` continues a stopped
    stage from its last.pt, and a finished one is loaded from it, not trained again. Returns its summary entry."""
    cfg, stage, folder = run.cfg, wired.stage, run.run_dir / PRETRAIN
    lr = cfg.optimizer.lr if stage.lr is None else stage.lr
    schedule = {"schedule": "step", "milestones": list(stage.milestones)} if stage.milestones else {"schedule": "constant"}
    stage_cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=lr, warmup_epochs=0, **schedule))
    make_checkpoint = checkpoint_maker(wired.student, cfg.student, stage_cfg, run.data)
    with stage.training():  # the optimizer moves what the stage's terms reach, of the student and the method
        fit_network(
            wired.student, wired.stage_step, stage_cfg, stage.epochs, run.compute, run.data, run.loaders, folder, PRETRAIN, None,
            make_checkpoint, wired.objective, validate=lambda: {"val_acc": None}, save_best=lambda epoch, history: None,
        )
    return {"epochs": stage.epochs, "lr": lr, "trains_student": stage.trains_student, "run_dir": str(folder)}


def prepare_student(run: KDRun, summary: dict) -> tuple[KDWiring, nn.Module | None]:
    """Everything `distil` needs before the student trains, its config checked (`kd.wiring.check_kd`): the
    teacher (and the baseline) obtained into `summary`, then the student wired (`kd.wiring.wire_kd`) from
    the run's seed, the teacher's logits table and its forward pass (once per batch) shared through
    `run.shared`. Returns the wiring and the teacher (None: the objective reads none)."""
    cfg, data, loaders = run.cfg, run.data, run.loaders
    supply = teacher_supply(cfg, loaders.train.augment, len(data.train), data.info.num_classes, run.compute.device)
    teacher = None
    summary["teacher"] = None  # loss=kd alpha=0 and teacher-free methods build no teacher, unless the student copies it
    if supply != NONE or copies_teacher(cfg.student):
        teacher, summary["teacher"] = obtain_teacher(run)
    alone = supply == NONE and cfg.loss["name"] == "kd"  # loss=kd alpha=0 is the baseline itself
    if cfg.baseline and not alone:
        if cfg.student.starts_trained:  # the same start trained alone is the run with alpha=0
            log.info("baseline: none for a student that starts trained; run the same command with alpha=0 to compare")
        else:
            summary["baseline"] = baseline_entry(run, cfg.student, run.run_dir / "baseline")
    views = None
    if supply == VIEWS:
        views = run.shared.once("teacher_views", lambda: teacher_view_store(run, teacher, run.shared.students))
        supply = VIEWS if views is not None else LIVE
    transfer = loaders.eval_loader(data.train) if supply == CACHED else None
    wired = wire_kd(
        cfg, data, run.compute, teacher if supply != NONE else None, supply=supply, transfer=transfer, views=views, shared=run.shared,
        seed=cfg.seed, stacked=run.shared.stacked, init_from=teacher,
    )
    if wired.supply == CACHED:
        log.info(f"teacher: logits of the {len(data.train)} transfer images cached; kd steps skip the teacher")
    if wired.supply == VIEWS:
        log.info(f"teacher: logits of every view of the {len(data.train)} transfer images stored; kd steps skip the teacher")
    summary["teacher_logits_cached"] = wired.supply == CACHED
    summary["teacher_supply"] = wired.supply
    return wired, teacher


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


# how the speed-up is timed: 3 warm-up calls of each network, then the median of 10 rounds of one call of
# each in turn, at a fixed batch of 256 test images (docs/shipping.md: the spread this holds it to)
SPEEDUP_TIMING = Timing(warmup=3, batch=256, repeats=10)


def compare_with_teacher(run: KDRun, summary: dict, teacher: nn.Module, student: nn.Module) -> None:
    """Compression (teacher / student parameters) and how much faster the product is: forward images/s of
    both as deployed (`ship.evaluate.throughputs`: timed in turns at a fixed batch of test images), on the
    run's device and precision."""
    summary["compression"] = summary["teacher"]["params"] / summary["student"]["params"]
    images = first_images(run.loaders.test, SPEEDUP_TIMING.batch)
    rates = throughputs([teacher, student], images, run.compute, SPEEDUP_TIMING)
    summary["teacher"]["inference_images_per_s"], summary["student"]["inference_images_per_s"] = rates
    summary["speedup"] = rates[1] / rates[0]
