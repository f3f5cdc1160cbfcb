"""`distill <command> [overrides]`: a thin layer that hands each command to Hydra.

Hydra keeps its usual behaviour (composition, `-m` sweeps, `--cfg job`, `--help`, run folders,
logging); this module only picks the primary config, and turns every error into one line on
stderr and a non-zero exit. Set HYDRA_FULL_ERROR=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from functools import partial
from pathlib import Path

from .config import config_dir, register_configs, to_plain
from .errors import DistillError, Interrupted, did_you_mean
from .runs import failed_jobs, read_summary, resume_command, resumption, run_status, search_objective

USAGE = """\
usage: distill <command> [key=value ...] [-m] [hydra flags]
       distill resume <run dir or sweep dir>
       distill report <folder>... [--by key,key] [--sort column] [--out DIR] [--no-plots]
       distill eval|export|quantize <run dir or checkpoint> [option=value ...] [config key=value ...]

commands:
  train     train a teacher with cross-entropy              distill train teacher=cnn epochs=20
  kd        distil a student from a teacher                 distill kd student=mlp_small T=4 alpha=0.5
  bench     images/s of train/kd steps vs a reference loop  distill bench dataset=cifar10
  resume    continue a crashed or interrupted run or sweep  distill resume outputs/2025-01-01/12-00-00.000000_kd
  report    table, plots, report.md/csv/json of a sweep     distill report outputs/multirun/2025-01-01/12-00-00.000000_kd
  list      list the datasets, models and losses
  eval      accuracy, ECE, MACs, latency of a run's models  distill eval outputs/2025-01-01/12-00-00.000000_kd
  export    ONNX / torch.export file, checked vs PyTorch    distill export <run dir>/best.pt format=onnx
  quantize  static int8 for the CPU, against fp32           distill quantize <run dir>/best.pt

Hydra flags work as usual: -m/--multirun (distill kd -m T=2,4,8 alpha=0.5,0.9),
--cfg job (print the composed config), --help (groups and options of a command).
"""

COMMAND_NAMES = ("train", "kd", "bench", "resume", "report", "list", "eval", "export", "quantize")
# the options of the commands that ship a trained model, with their defaults; any other key=value
# overrides the run's recorded config (dataset.root=..., eval_batch_size=..., device.threads=...)
SHIP_OPTIONS = {
    "eval": {"out": "", "gpu": True, "calls": 200, "batch": 256},
    "export": {"format": "", "out": "", "atol": 1e-4},
    "quantize": {"out": "", "gpu": True, "calls": 200, "batch": 256, "calibration": 512},
}


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
    validation accuracy (`runs.search_objective`), which an Optuna sweep maximises.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import validate_config
    from .report import log, share_terminal

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
        if command in ("train", "kd") and (config.device.processes > 1 or _torchrun_world_size()):
            return search_objective(_run_distributed(command, config, run_dir))
        return search_objective(_runner(command)(config, run_dir))
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        stopped.run_dir = run_dir
        record({"status": "interrupted", "error": stopped.describe(), "resume": resume_command(run_dir)})
        raise stopped from None
    except Exception as error:
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            raise
        message = one_line(error)
        if _torchrun_world_size():  # the rank whose error stopped the others, not their lost connection
            from .distributed import world

            message = world().root_cause(message, error)
            world().report_error(message)
        FAILED_JOBS.append((str(run_dir), message))
        if hydra_config.mode == RunMode.MULTIRUN:
            log.error(f"job {hydra_config.job.num} failed: {message}")
        record({"status": "failed", "error": message})
        return None


def _completed_before(cfg, run_dir: Path, hydra_config) -> bool:
    """Whether this is a job of a resumed sweep (`resume=true`, see `runs.sweep_resumption`) that completed."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    resumed = hydra_config.mode == RunMode.MULTIRUN and OmegaConf.select(cfg, "resume", default=False)
    return bool(resumed) and run_status(run_dir) == "completed"


def record_summary(command: str, cfg, run_dir: Path, summary: dict) -> None:
    """Write how a run ended into its summary.json; a disk too full for it gets a log line, not a second error."""
    from .files import write_json_atomic
    from .report import log

    try:
        write_json_atomic({"command": command, **summary, "config": to_plain(cfg)}, run_dir / "summary.json")
    except (OSError, DistillError) as error:
        log.warning(f"summary.json not written: {one_line(error)}")


def _torchrun_world_size() -> int:
    """The number of processes torchrun started this one among (0: torchrun did not start it)."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0


def _run_distributed(command: str, config, run_dir: Path) -> dict | None:
    """`command` in several processes: started here with torchrun (`device.processes=N`), or as rank 0
    of the torchrun that started this process, handing the other ranks their work (distributed.py)."""
    from . import distributed

    world_size = _torchrun_world_size()
    distributed.check_devices(config.device, max(world_size, config.device.processes))
    if command == "kd":
        from .config import ENSEMBLE
        from .losses.base import build_method

        if not build_method(dict(config.loss)).data_parallel:
            raise DistillError(f"loss={config.loss['name']} cannot be trained by several processes yet (its memory banks); use one")
        modes = {"teacher=ensemble": config.teacher.arch == ENSEMBLE, "peers": config.peers,
                 "generations": config.generations > 1, "assistants": config.assistants}
        chosen = [key for key, on in modes.items() if on]
        if chosen:
            raise DistillError(f"{chosen[0]}: the training modes run in one process for now (not with several processes)")
    if not world_size:
        return distributed.launch(command, to_plain(config), run_dir, config.device.processes)
    if config.device.processes not in (1, world_size):
        raise DistillError(
            f"device.processes={config.device.processes}, but torchrun started {world_size} processes; "
            "under torchrun leave device.processes at 1"
        )
    distributed.lead(command, to_plain(config), run_dir)
    return _runner(command)(config, run_dir)


def _runner(command: str):
    """The function behind a command (imported only once its config is valid: it imports torch)."""
    if command == "bench":
        from .bench import run_bench

        return run_bench
    from .tasks import COMMANDS

    return COMMANDS[command]


def one_line(error: BaseException) -> str:
    """A one-line message for any error, naming the config key where there is one."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) or "Available options in" in str(error):
        return _missing_option(str(error))
    # Hydra wraps OmegaConf errors (wrong type, unknown key) raised while merging overrides
    cause = error
    while cause is not None and not isinstance(cause, (OmegaConfBaseException, DistillError)):
        cause = cause.__cause__
    if isinstance(cause, DistillError):
        return str(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "msg", None):
        key = getattr(cause, "full_key", None)
        text = _first_line(cause.msg).replace("is not in struct", "is not a known key")
        if key and key not in text:
            text = f"{key}: {text}"
        if key and ".kwargs." in key:
            text += f" (a model argument missing from the model's YAML is added with +{key}=...)"
        return text
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"cannot use {error.filename}: {error.strerror}"
    text = _first_line(str(error)) or type(error).__name__
    if isinstance(error, (DistillError, HydraException)):
        return text
    return f"{type(error).__name__}: {text} (set HYDRA_FULL_ERROR=1 for the traceback)"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _missing_option(text: str) -> str:
    """'Could not find teacher/foo ... Available options in teacher: ...' as one line with suggestions."""
    match = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if not match:
        return _first_line(text)
    group, name = match.groups()
    listing = text.split("Available options in", 1)[1].split("\n\n", 1)[0] if "Available options in" in text else ""
    options = re.findall(r"^\t(\S+)\s*$", listing, flags=re.MULTILINE)
    plugin = " (if it is a Hydra plugin's, install it: pip install 'distill-cli[sweeps]')" if group.startswith("hydra/") else ""
    return f"{group}={name}: no such {group} option; {did_you_mean(name, options)}{plugin}"


def _list() -> None:
    """Print the registered datasets, model configs, architectures, losses and other groups."""
    from omegaconf import OmegaConf
    from rich.table import Table

    from .data import DATASETS
    from .losses import LOSSES
    from .models import MODELS
    from .report import CONSOLE

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
    CONSOLE.print(table)
    CONSOLE.print(_methods_table())


def _methods_table():
    """The KD methods (`loss=`), what each computes and its published defaults."""
    from rich.markup import escape
    from rich.table import Table

    from .losses import method_catalogue

    table = Table(title=escape("KD methods: distill kd loss=<name> [alpha=...] [loss.<key>=...]"))
    for column in ("loss", "computes", "published defaults"):
        table.add_column(column)
    for row in method_catalogue():
        table.add_row(*row)
    table.caption = "alpha weights the Hinton KD term (T), 1 - alpha the cross-entropy; any method takes alpha > 0"
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script and `python -m distill_cli`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMAND_NAMES:
        print(f"distill: error: unknown command {command!r}: {did_you_mean(command, COMMAND_NAMES)}", file=sys.stderr)
        return 2
    if command == "resume":
        return _resume(rest)
    if command == "report":
        return _report(rest)
    if command in SHIP_OPTIONS:
        return _ship(command, rest)
    return _run_command(command, rest)


def _resume(args: list[str]) -> int:
    """`distill resume <run dir or sweep dir>`: run the folder's command again in it, continuing from its
    checkpoint (a sweep: each job from its own, see `runs.sweep_resumption`)."""
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
    """`distill report <folder>...`: print the sweep table and write report.md/csv/json and plots (sweep_report.py)."""
    from .sweep_report import build_report, print_report, write_report

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
    options, overrides = dict(SHIP_OPTIONS[command]), []
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals:
            raise DistillError(f"{arg!r} is not key=value; options: {', '.join(SHIP_OPTIONS[command])}")
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
        print(f"usage: distill {command} <run dir or checkpoint> [{' '.join(f'{k}=...' for k in SHIP_OPTIONS[command])}] [config key=value ...]", file=sys.stderr)
        return 2
    try:
        options, overrides = _ship_arguments(command, args[1:])
        if command == "eval":
            from .evaluate import Timing, run_eval

            run_eval(args[0], overrides, options["out"], options["gpu"], Timing(calls=options["calls"], batch=options["batch"]))
        elif command == "export":
            from .export import run_export

            run_export(args[0], options["format"], overrides, options["out"], options["atol"])
        else:
            from .quantize import run_quantize

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
    distributed = None
    try:
        if _torchrun_world_size():
            _check_torchrun_command(command, rest)
            from . import distributed

            if not distributed.join().is_main:
                return distributed.follow(command)
        if command == "list":
            _list()
            return 0
        if command in ("kd", "bench") and ("--help" in rest or "-h" in rest):
            from .report import CONSOLE

            CONSOLE.print(_methods_table())
        import hydra

        from .sweeps import SweepRefused, SweepWatch

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
        if distributed is not None:
            distributed.release()
    return 0


def _check_torchrun_command(command: str, rest: list[str]) -> None:
    """Under torchrun: only train and kd, one run (a sweep's jobs each start their own torchrun)."""
    if command not in ("train", "kd"):
        raise DistillError(f"torchrun runs `distill train` and `distill kd`, not `distill {command}`")
    if "-m" in rest or "--multirun" in rest:
        raise DistillError(
            "a sweep (-m) under torchrun: run `distill kd -m ... device.processes=N` instead (each job starts its own torchrun)"
        )


def run() -> None:
    """Console-script wrapper: exit with `main`'s status."""
    sys.exit(main())
