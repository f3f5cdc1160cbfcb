"""Hydra callbacks of the launching process of a sweep (registered in configs/hydra_settings.yaml)."""

from __future__ import annotations

import time
from pathlib import Path

from hydra.experimental.callback import Callback

from ..core.commands import SUMMARY_COMMANDS
from ..core.console import log
from ..core.errors import one_line
from .report import print_report, write_report
from .results import build_report


class SweepRefused(BaseException):
    """A sweep whose settings cannot work, found before any job starts. A BaseException: Hydra turns a
    callback's Exceptions into warnings and carries on, and this must stop the sweep (`main` prints it)."""


class SweepWatch(Callback):
    """Checks a multirun's sweeper settings before any job starts, and notes where it puts its jobs, so that
    `distill` also reports the jobs that failed in other processes (a parallel launcher: joblib, submitit)."""

    # (sweep folder, start time) of each multirun launched by this process
    sweeps: list[tuple[Path, float]] = []

    def on_multirun_start(self, config, **kwargs) -> None:
        if "optuna" in config.hydra.sweeper._target_:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # Hydra logs the study's settings itself
            if config.dataset.val_split == 0:
                raise SweepRefused(
                    "hydra/sweeper=optuna maximises validation accuracy, and dataset.val_split=0 leaves no "
                    "validation split (the test split is never used to choose)"
                )
        SweepWatch.sweeps.append((Path(config.hydra.sweep.dir), time.time()))


def report_sweep(sweep_dir: Path, interrupted: bool = False) -> None:
    """Print the report of the runs in `sweep_dir` and write it there (report.md/csv/json, plots/); one that
    cannot be made is a warning (the sweep's results stand without it). An `interrupted` sweep in which no
    job finished gets none (its jobs' interrupted summaries say how to resume them)."""
    try:
        report = build_report([sweep_dir])
        if interrupted and not any(row.completed for row in report.rows):
            log.info(f"sweep interrupted before any job finished: no sweep report in {sweep_dir}")
            return
        print_report(report)
        write_report(report, sweep_dir)
    except Exception as error:
        log.warning(f"sweep report not written: {one_line(error)}")
        return
    log.info(f"sweep report: {sweep_dir / 'report.md'}")


class SweepReportCallback(Callback):
    """Print the sweep report and write it (report.md/csv/json, plots/) into the sweep folder. An interrupted
    sweep never gets here: `distill` reports what finished itself (`report_interrupted`, from `cli.main`)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.hydra.job.config_name in SUMMARY_COMMANDS:  # bench sweeps have no summaries
            report_sweep(Path(config.hydra.sweep.dir))


def report_interrupted(command: str) -> None:
    """The report of each sweep this process launched, over the jobs that finished before an interrupt
    (Ctrl-C, SIGTERM) stopped it; Hydra's `on_multirun_end` does not run then."""
    if command in SUMMARY_COMMANDS:
        for sweep_dir, _ in SweepWatch.sweeps:
            report_sweep(sweep_dir, interrupted=True)
