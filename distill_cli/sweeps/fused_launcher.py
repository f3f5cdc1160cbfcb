"""`hydra/launcher=fused`: Hydra's side of fused sweeps. The sweep's kd jobs that can share batches and a
teacher (`runs.fused.group_key`) each get the folder Hydra's basic launcher would give them, then train
together in this process (`runs.fused.run_kd_fused`); any other job runs as the basic launcher runs it.
The plugin class (hydra_plugins/distill_fused_launcher) hands its work here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict, read_write

from ..core.checkpoint import resume_position
from ..core.config import KDConfig, to_plain, validate_config
from ..core.console import job_log_files, log
from ..core.errors import Interrupted, one_line
from ..core.run_folders import record_summary, resume_command, run_status, search_objective
from ..runs.fused import group_key, run_kd_fused
from ..runs.memory import checked_budget
from ..training.stacked import BATCHING
from .callbacks import SweepRefused


def launch_fused(
    hydra_context, task_function, config, job_overrides, initial_job_idx: int, batching: str = "auto", memory_gb=None
) -> list:
    """`hydra/launcher=fused` (hydra_plugins/distill_fused_launcher): the sweep's kd jobs of one `group_key`
    train fused (`run_kd_fused` with `batching` and within `memory_gb` GiB: `hydra.launcher.batching` and
    `.memory_gb`), each in the folder Hydra's basic launcher gives it (`.hydra/`, its log file); any other job
    (a group of one, a training mode, a config that does not validate, `distill train`) runs as the basic
    launcher runs it. Returns Hydra's JobReturn of each job, in the sweep's order."""
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
    and `cli.main` does not run it again); else `key` and the position its last.pt continues from, since the
    students of a group continue from one position (`fit_together`; a kill -9 can land between their saves)."""
    if run_status(run_dir) == "completed":
        return None
    return f"{key} from {resume_position(run_dir, to_plain(cfg))}"


def _run_job(hydra_context, task_function, job):
    """One job as Hydra's basic launcher runs it: its folder, `.hydra/`, log file, then `task_function`."""
    return run_job(
        hydra_context=hydra_context, task_function=task_function, config=job,
        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
    )


def _run_group(hydra_context, command: str, jobs: list, batching: str, memory_gb: float | None) -> list:
    """Kd jobs of one group: each job's folder set up by Hydra (`_run_job` with a task that only validates its
    config), then all trained fused; failures and interrupts recorded as `distill` records a job's."""
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
