"""Hydra callbacks (configs/hydra_settings.yaml): every train/kd multirun ends with its sweep report."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from .runs import COMMANDS


class SweepReportCallback(Callback):
    """Print the sweep report and write it (report.md/csv/json, plots/) into the sweep folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .cli import one_line
        from .report import log
        from .sweep_report import build_report, print_report, write_report

        if config.hydra.job.config_name not in COMMANDS:  # bench sweeps have no summaries
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = build_report([sweep_dir])
            print_report(report)
            write_report(report, sweep_dir)
        except Exception as error:  # the sweep's results stand without the report
            log.warning(f"sweep report not written: {one_line(error)}")
            return
        log.info(f"sweep report: {sweep_dir / 'report.md'}")
