"""`distill <command> [overrides]`: a thin layer that hands each command to Hydra.

Hydra keeps its usual behaviour (composition, `-m` sweeps, `--cfg job`, `--help`, run folders,
logging); this module only picks the primary config, and turns every error into one line on
stderr and a non-zero exit. Set HYDRA_FULL_ERROR=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path

from ..core.commands import BY_NAME, command_lines
from ..core.config import config_dir, experiment_presets, register_configs, validate_config
from ..core.console import CONSOLE, log, share_terminal
from ..core.errors import DistillError, Interrupted, StopSignals, did_you_mean, one_line
from ..core.processes import available_cpus, exit_process, jobs_at_once, threads_per_job, torchrun_world_size
from ..core.run_folders import (
    failed_jobs,
    obtained,
    read_summary,
    record_summary,
    resume_command,
    resumption,
    run_status,
    search_objective,
)

USAGE = f"""\
usage: distill <command> [key=value ...] [-m] [hydra flags]
       distill resume <run dir or sweep dir>
       distill report <folder>... [--by key,key] [--sort column] [--out DIR] [--no-plots]
       distill eval|export|quantize <run dir or checkpoint> [option=value ...] [config key=value ...]

commands:
{command_lines()}

Hydra flags work as usual: -m/--multirun (distill kd -m T=2,4,8 alpha=0.5,0.9),
--cfg job (print the composed config), --help (groups and options of a command).
"""


# (run folder, one-line error) of each job that failed in this process; reported by main()
FAILED_JOBS: list[tuple[str, str]] = []


# the launchers that run a sweep's jobs in this process, one after another (the terminal is not shared)
IN_PROCESS_LAUNCHERS = (".BasicLauncher", ".FusedLauncher")


def _task(command: str, cfg) -> float | None:
    """The Hydra job: validate the config, run the command; on error record a failed summary. A job of a
    resumed sweep that completed before is not run again (its summary stands).

    Errors are not raised into Hydra (which would print its own multi-line report); `main` prints
    them as one line each once every job of a sweep has run. An interrupt (Ctrl-C, SIGTERM) is
    recorded as an interrupted summary and raised on, which stops a sweep too. Returns the run's
    validation accuracy (`core.run_folders.search_objective`), which an Optuna sweep maximises.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ..runs.commands import runner  # torch and the models: once a command runs, not for --help
    from .torchrun import run_distributed

    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir).resolve()
    if hydra_config.mode == RunMode.MULTIRUN and not hydra_config.launcher._target_.endswith(IN_PROCESS_LAUNCHERS):
        share_terminal(hydra_config.job.num)

    if _completed_before(cfg, run_dir, hydra_config):
        log.info(f"job {hydra_config.job.num}: {run_dir} completed before; not run again")
        return search_objective(read_summary(run_dir))
    record = partial(record_summary, command, cfg, run_dir)
    try:
        config = validate_config(command, cfg)
        if hydra_config.mode == RunMode.MULTIRUN:
            share_cores(config, jobs_at_once(hydra_config.launcher))
        if BY_NAME[command].processes and (config.device.processes > 1 or torchrun_world_size()):
            return search_objective(run_distributed(command, config, run_dir))
        return search_objective(runner(command)(config, run_dir))
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        stopped.run_dir = run_dir
        with StopSignals():  # a second signal (the launcher's SIGTERM after Ctrl-C) waits for the summary
            record({**obtained(interrupt), "status": "interrupted", "error": stopped.describe(), "resume": resume_command(run_dir)})
        raise stopped from None
    except Exception as error:
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            raise
        # torchrun sends SIGTERM to every rank once one has failed: it must not cut this record short
        with StopSignals():
            _record_failure(error, run_dir, hydra_config, record)
        return None


def _record_failure(error: Exception, run_dir: Path, hydra_config, record) -> None:
    """The failed job's one line (under torchrun: the rank whose error stopped the others, not their lost
    connection), kept for `main` to print and written to the run's summary."""
    from hydra.types import RunMode

    message = one_line(error)
    if torchrun_world_size():
        from ..core.world import world

        message = world().root_cause(message, error)
        world().report_error(message)
    FAILED_JOBS.append((str(run_dir), message))
    if hydra_config.mode == RunMode.MULTIRUN:
        log.error(f"job {hydra_config.job.num} failed: {message}")
    record({**obtained(error), "status": "failed", "error": message})  # with what it obtained before failing


def share_cores(config, jobs: int) -> None:
    """A sweep job that runs beside `jobs` - 1 others in processes of this machine (joblib's n_jobs) gets its
    share of the cores: device.threads = cores // (jobs x device.processes), said in one log line. Without it
    a job's threads depend on the shell: joblib sets OMP/MKL_NUM_THREADS to cores // n_jobs in its workers
    only where the shell has not set them, and a shell that sets them to every core oversubscribes the CPU
    (measured 5-10x slower, docs/sweeps.md). An explicit device.threads wins."""
    device = getattr(config, "device", None)
    if device is None or jobs < 2 or device.threads:
        return
    device.threads = threads_per_job(jobs, device.processes)
    processes = f" x {device.processes} processes" if device.processes > 1 else ""
    log.info(
        f"device.threads={device.threads}: the {available_cpus()} cores split among the {jobs} jobs{processes} that "
        f"run at once (hydra.launcher.n_jobs); set device.threads to choose"
    )


def _completed_before(cfg, run_dir: Path, hydra_config) -> bool:
    """Whether this is a job of a resumed sweep (`resume=true`, see `core.run_folders.sweep_resumption`) that completed."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    resumed = hydra_config.mode == RunMode.MULTIRUN and OmegaConf.select(cfg, "resume", default=False)
    return bool(resumed) and run_status(run_dir) == "completed"


def _list() -> None:
    """Print the registered datasets, model configs, architectures, losses and other groups."""
    from omegaconf import OmegaConf
    from rich.table import Table

    from ..data import DATASETS
    from ..losses import LOSSES
    from ..models import MODELS

    table = Table(title="distill: what a config can name")
    table.add_column("group")
    table.add_column("options")
    models = {p.stem: OmegaConf.load(p).arch for p in sorted((config_dir() / "model").glob("*.yaml"))}
    table.add_row("dataset", ", ".join(DATASETS.names()))
    table.add_row("teacher / student", ", ".join(f"{name} ({arch})" if name != arch else name for name, arch in models.items()))
    table.add_row("architectures", ", ".join(MODELS.names()))
    table.add_row("loss", ", ".join(LOSSES.names()))
    for group in ("optimizer", "device", "logger"):
        table.add_row(group, ", ".join(p.stem for p in sorted((config_dir() / group).glob("*.yaml"))))
    presets = experiment_presets()
    for command in ("train", "kd"):
        table.add_row(f"experiment ({command})", ", ".join(name for name, used_by in presets.items() if used_by == command))
    CONSOLE.print(table)
    CONSOLE.print(_methods_table())


def _methods_table():
    """The KD methods (`loss=`), what each computes and its published defaults."""
    from rich.markup import escape
    from rich.table import Table

    from ..losses import method_catalogue

    table = Table(title=escape("KD methods: distill kd loss=<name> [alpha=...] [loss.<key>=...]"))
    for column in ("loss", "computes", "published defaults"):
        table.add_column(column)
    for row in method_catalogue():
        table.add_row(*row)
    table.caption = (
        "alpha weights the Hinton KD term (T), loss.ce_weight the cross-entropy (unset: 1 - alpha); any method takes alpha > 0"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script and `python -m distill_cli`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command not in BY_NAME:
        print(f"distill: error: unknown command {command!r}: {did_you_mean(command, BY_NAME)}", file=sys.stderr)
        return 2
    kind = BY_NAME[command].kind
    if kind == "resume":
        return _resume(rest)
    if kind == "report":
        return _report(rest)
    if kind == "ship":
        return _ship(command, rest)
    return _run_command(command, rest)


def _resume(args: list[str]) -> int:
    """`distill resume <run dir or sweep dir>`: run the folder's command again in it, continuing from its
    checkpoint (a sweep: each job from its own, see `core.run_folders.sweep_resumption`)."""
    if not args or args[0].startswith("-"):
        print("usage: distill resume <run dir or sweep dir>", file=sys.stderr)
        return 2
    if len(args) > 1:
        extra = " ".join(args[1:])
        print(f"distill resume: error: extra arguments {extra!r}: a resumed run keeps the config it started with", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    try:
        plan = resumption(run_dir)
    except DistillError as error:
        print(f"distill resume: error: {error}", file=sys.stderr)
        return 1
    if run_status(run_dir) == "completed":
        print(f"distill resume: {run_dir} already completed; nothing to do")
        return 0
    os.chdir(plan.cwd)
    return _run_command(plan.command, plan.arguments)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _report(args: list[str]) -> int:
    """`distill report <folder>...`: print the sweep table and write report.md/csv/json and plots (sweeps/report.py)."""
    from ..sweeps.report import print_report, write_report
    from ..sweeps.results import build_report

    parser = _OneLineParser(prog="distill report", description="One table over the runs in the folders given.")
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, sweep folders or outputs/")
    parser.add_argument("--by", help="settings that make a configuration, comma-separated (default: the overrides that vary, seed folded)")
    parser.add_argument("--sort", help="order rows by a setting (ascending) or a result column (largest first)")
    parser.add_argument("--out", type=Path, help="where report.md/csv/json and plots/ go (default: the first folder)")
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    try:
        options = parser.parse_args(args)
    except SystemExit as exit:
        return exit.code
    missing = [str(folder) for folder in options.folders if not folder.is_dir()]
    if missing:
        print(f"distill report: error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        report = build_report(options.folders, by=options.by.split(",") if options.by else None, sort=options.sort)
        print_report(report)
        written = write_report(report, options.out or options.folders[0], plots=not options.no_plots)
    except DistillError as error:
        print(f"distill report: error: {error}", file=sys.stderr)
        return 1
    print(f"distill report: wrote {written[0]} (and report.csv, report.json, {len(written) - 3} plots)")
    if not any(row.completed for row in report.rows):
        print("distill report: error: no completed runs to report", file=sys.stderr)
        return 1
    return 0


def _ship_arguments(command: str, args: list[str]) -> tuple[dict, list[str]]:
    """`command`'s options (typed like their defaults) and the config overrides among `key=value` args."""
    options, overrides = dict(BY_NAME[command].options), []
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals:
            raise DistillError(f"{arg!r} is not key=value; options: {', '.join(options)}")
        if key not in options:
            overrides.append(arg)
            continue
        default = options[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                options[key] = value.lower() == "true"
            else:
                options[key] = type(default)(value)
        except ValueError:
            raise DistillError(f"{key}={value}: expected {type(default).__name__}") from None
    return options, overrides


def _ship(command: str, args: list[str]) -> int:
    """`distill eval|export|quantize <run dir or checkpoint> [key=value ...]`: errors are one line on stderr."""
    if not args or args[0].startswith("-"):
        print(f"usage: distill {command} <run dir or checkpoint> [{' '.join(f'{k}=...' for k in BY_NAME[command].options)}] [config key=value ...]", file=sys.stderr)
        return 2
    try:
        options, overrides = _ship_arguments(command, args[1:])
        if command == "eval":
            from ..ship.evaluate import Timing, run_eval

            run_eval(args[0], overrides, options["out"], options["gpu"], Timing(calls=options["calls"], batch=options["batch"]))
        elif command == "export":
            from ..ship.export import run_export

            run_export(args[0], options["format"], overrides, options["out"], options["atol"])
        elif command == "prune":
            from ..ship.prune import run_prune

            run_prune(args[0], overrides, options)
        elif options["qat"]:
            from ..runs.qat import run_qat

            run_qat(args[0], overrides, options)
        else:
            from ..ship.quantize import run_quantize

            run_quantize(args[0], overrides, options)
    except KeyboardInterrupt:
        print(f"distill {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"distill {command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def _report_interrupted_sweeps(command: str) -> None:
    """The report of what finished in each sweep an interrupt stopped (`sweeps.callbacks.report_interrupted`);
    a second interrupt skips it."""
    from ..sweeps.callbacks import report_interrupted

    try:
        report_interrupted(command)
    except KeyboardInterrupt:
        pass


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _run_command(command: str, rest: list[str]) -> int:
    """Run `distill <command> <rest>` through Hydra; errors and interrupts become one line on stderr."""
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if show_traceback:
        os.environ["DISTILL_TRACEBACK"] = "1"
    else:  # a log file on a full disk would print a traceback for every line
        logging.raiseExceptions = False
    # SIGTERM (a scheduler or `kill`) stops a run the way Ctrl-C does
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if previous_sigterm is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    torchrun = None
    try:
        if torchrun_world_size():
            from . import torchrun  # torch.distributed: only under torchrun

            torchrun.check_torchrun_command(command, rest)
            if not torchrun.join().is_main:
                return torchrun.follow(command)
        if BY_NAME[command].kind == "list":
            _list()
            return 0
        if command in ("kd", "bench") and ("--help" in rest or "-h" in rest):
            CONSOLE.print(_methods_table())
        import hydra

        from ..sweeps.callbacks import SweepRefused, SweepWatch

        register_configs()
        FAILED_JOBS.clear()  # main() may run more than once in a process (tests, notebooks)
        SweepWatch.sweeps.clear()
        # Hydra then lets errors through to us instead of printing a trace and exiting itself
        os.environ["HYDRA_FULL_ERROR"] = "1"
        sys.argv = [f"distill {command}", *rest]
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=command)(partial(_task, command))()
        failures = dict(FAILED_JOBS)
        for sweep_dir, since in SweepWatch.sweeps:  # jobs that ran in other processes
            failures.update(failed_jobs(sweep_dir, since))
        for run_dir, message in failures.items():
            where = f" (job {run_dir})" if len(failures) > 1 else ""
            print(f"distill {command}: error{where}: {message}", file=sys.stderr)
        if failures:
            return 1
    except SweepRefused as refused:
        print(f"distill {command}: error: {refused}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        _report_interrupted_sweeps(command)
        resume = f"; resume with: {resume_command(stopped.run_dir)}" if stopped.run_dir else ""
        print(f"distill {command}: {stopped.describe()}{resume}", file=sys.stderr)
        return 128 + stopped.signum
    except Exception as error:
        if show_traceback:
            raise
        print(f"distill {command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if torchrun is not None:
            torchrun.release()
    return 0


def run() -> None:
    """Console-script wrapper: exit with `main`'s status (`exit_process`)."""
    exit_process(main())
