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
from .data import DataSplits
from .engine import Compute, Training, fit_together, rng_state, set_rng_state
from .errors import DistillError
from .files import write_json_atomic
from .losses.base import build_method
from .memory import checked_budget, plan_fused
from .models import build_model
from .modes import kd_mode
from .report import job_log_files, log, logging_run
from .runs import run_status
from .tasks import (
    KDRun,
    Loaders,
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
from .checkpoint import BEST, resume_position
from .stacked import BATCHING, StackedStudents, choose_batching
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
    summaries: list[dict | None] = [None] * len(cfgs)
    compute, data, loaders = prepare_run(cfgs[0])
    shared = Shared()
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
        log.info(f"fused: {len(trainings)} students train on shared batches, {why}")
        errors = fit_together(trainings, loaders.train, streams, shared.stacked) if trainings else []
        for (index, run, summary, student, objective, teacher), training, error in zip(jobs, trainings, errors):
            with logging_run(run.run_dir):
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


def _group_batching(batching: str, cfg: KDConfig, compute, data, loaders, count: int) -> tuple[str, str]:
    """`stacked.choose_batching` for `count` students of `cfg`, measured with throwaway students on one
    batch of training images; the global RNG states are left as they were (the jobs' streams start there)."""
    if batching == "sequential":
        return choose_batching(batching, [], (), None, compute)
    state = rng_state()
    try:
        students = [compute.place(build_model(cfg.student, data.info, "student")) for _ in range(count)]
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


def launch_fused(
    hydra_context, task_function, config, job_overrides, initial_job_idx: int, batching: str = "auto", memory_gb=None
) -> list:
    """`hydra/launcher=fused` (hydra_plugins/distill_fused_launcher): the sweep's kd jobs of one `group_key`
    train fused (`run_kd_fused` with `batching` and within `memory_gb` GiB: `hydra.launcher.batching` and
    `.memory_gb`), each in the folder Hydra's basic launcher gives it (`.hydra/`, its log file); any other job
    (a group of one, a training mode, a config that does not validate, `distill train`) runs as the basic
    launcher runs it. Returns Hydra's JobReturn of each job, in the sweep's order."""
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from omegaconf import OmegaConf, open_dict

    from .sweeps import SweepRefused

    if batching not in BATCHING:
        raise SweepRefused(f"hydra.launcher.batching: expected one of {', '.join(BATCHING)}, got {batching!r}")
    memory_gb = checked_budget(memory_gb)
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = []
    for num, overrides in enumerate(job_overrides, start=initial_job_idx):
        job = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.id = job.hydra.job.num = num
        jobs.append(job)
        processes = OmegaConf.select(job, "device.processes", default=1)
        if processes != 1:
            raise SweepRefused(
                f"hydra/launcher=fused trains a sweep's jobs in this process; job {num} has device.processes={processes} "
                "(use the basic launcher for data-parallel jobs)"
            )
    command = config.hydra.job.config_name
    groups: dict[object, list[int]] = {}  # by group_key; a job that runs alone by its position
    for position, job in enumerate(jobs):
        key = _fusion_key(command, job)
        groups.setdefault(position if key is None else key, []).append(position)
    log.info(f"Launching {len(jobs)} jobs in {len(groups)} group(s) (hydra/launcher=fused)")
    returns = {}
    for members in groups.values():
        for position in members:
            log.info(f"\t#{jobs[position].hydra.job.num} : {' '.join(filter_overrides(job_overrides[position]))}")
        if len(members) == 1:
            returns[members[0]] = _run_job(hydra_context, task_function, jobs[members[0]])
        else:
            returns.update(zip(members, _run_group(hydra_context, command, [jobs[n] for n in members], batching, memory_gb)))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [returns[position] for position in range(len(jobs))]


def _fusion_key(command: str, job) -> str | None:
    """The `group_key` of a sweep job's composed config; None for one that runs alone."""
    import copy

    from omegaconf import open_dict, read_write

    from .config import validate_config

    if command != "kd":
        return None
    task_config = copy.deepcopy(job)
    with read_write(task_config), open_dict(task_config):
        del task_config["hydra"]
    try:
        cfg = validate_config(command, task_config)
        key = group_key(cfg)
        return _resumed_key(key, cfg, _job_dir(job)) if key is not None and cfg.resume else key
    except Exception:  # a config that does not validate runs alone, and its own run says what is wrong
        return None


def _job_dir(job) -> Path:
    """The folder Hydra's launchers give a sweep job (`_run_job`): hydra.sweep.dir / hydra.sweep.subdir."""
    return Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)


def _resumed_key(key: str, cfg: KDConfig, run_dir: Path) -> str | None:
    """The fusion key of a job of a resumed sweep (`resume=true`): None for one that completed (it runs alone,
    and `cli._task` does not run it again); else `key` and the position its last.pt continues from, since the
    students of a group continue from one position (`fit_together`; a kill -9 can land between their saves)."""
    if run_status(run_dir) == "completed":
        return None
    return f"{key} from {resume_position(run_dir, to_plain(cfg))}"


def _run_job(hydra_context, task_function, job):
    """One job as Hydra's basic launcher runs it: its folder, `.hydra/`, log file, then `task_function`."""
    from hydra.core.utils import run_job

    return run_job(
        hydra_context=hydra_context, task_function=task_function, config=job,
        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
    )


def _run_group(hydra_context, command: str, jobs: list, batching: str, memory_gb: float | None) -> list:
    """Kd jobs of one group: each job's folder set up by Hydra (`_run_job` with a task that only validates its
    config), then all trained fused; failures and interrupts recorded as `distill` records a job's."""
    import os

    from hydra.core.hydra_config import HydraConfig

    from .cli import one_line, record_summary
    from .config import validate_config
    from .errors import Interrupted
    from .runs import resume_command, search_objective

    prepared: list[tuple[KDConfig, Path]] = []

    def prepare(cfg) -> None:
        prepared.append((validate_config(command, cfg), Path(HydraConfig.get().runtime.output_dir).resolve()))

    returns = [_run_job(hydra_context, prepare, job) for job in jobs]
    cfgs, run_dirs = [cfg for cfg, _ in prepared], [run_dir for _, run_dir in prepared]
    try:
        with job_log_files(run_dirs, command):
            summaries = run_kd_fused(cfgs, run_dirs, batching, memory_gb)
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        for cfg, run_dir in prepared:
            record_summary(command, cfg, run_dir, {"status": "interrupted", "error": stopped.describe(), "resume": resume_command(run_dir)})
        stopped.run_dir = run_dirs[0]
        raise stopped from None
    except Exception as error:  # what the jobs share failed (the data, the teacher): every job of the group failed
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            raise
        failed = {"status": "failed", "error": one_line(error)}
        for cfg, run_dir in prepared:
            record_summary(command, cfg, run_dir, failed)
        summaries = [failed] * len(prepared)
    for job_return, summary in zip(returns, summaries):  # failed jobs: `distill` finds their summaries (runs.failed_jobs)
        job_return.return_value = search_objective(summary)
    return returns
