"""Run folders: how a run ended, and how `distill resume <run dir>` continues one (or `<sweep dir>` a whole sweep).

No torch here: the CLI reads run folders before it imports anything heavy.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from .commands import SUMMARY_COMMANDS
from .config import to_plain
from .console import log
from .errors import DistillError, one_line
from .files import write_json_atomic

# Hydra overrides that place a run folder or pick the mode; a resume sets its own
_PLACEMENT = {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode", "hydra.output_subdir"}


def read_summary(run_dir: Path) -> dict | None:
    """`run_dir/summary.json`; None while there is none, or when it cannot be read as a JSON object."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def run_status(run_dir: Path) -> str | None:
    """`status` in `run_dir/summary.json` (completed, failed, interrupted); None while it has none."""
    return (read_summary(run_dir) or {}).get("status")


def failed_jobs(sweep_dir: Path, since: float) -> list[tuple[str, str]]:
    """(job folder, error) of each job of the sweep in `sweep_dir` whose summary.json, written at or after
    `since` (a time.time()), says it failed: how the launching process learns of jobs that a parallel
    launcher (joblib, submitit) ran in other processes."""
    failed = []
    for summary_file in sorted(Path(sweep_dir).glob("*/summary.json"), key=lambda f: (len(f.parent.name), f.parent.name)):
        try:
            written = summary_file.stat().st_mtime
        except OSError:
            continue
        summary = read_summary(summary_file.parent) if written >= since else None
        if summary is not None and summary.get("status") == "failed":
            failed.append((str(summary_file.parent.resolve()), str(summary.get("error", "failed"))))
    return failed


def search_objective(summary: dict | None) -> float | None:
    """What a hyperparameter search (`hydra/sweeper=optuna`) maximises: the validation accuracy at the
    best.pt epoch of the run's product (kd: the student; train: the teacher), never a test-split number.
    None when the run has none (failed, a bench, or no validation split)."""
    if not isinstance(summary, dict):
        return None
    product = summary.get("student") if summary.get("command") == "kd" else summary.get("teacher")
    return product.get("val_acc_best") if isinstance(product, dict) else None


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in `run_dir`."""
    return f"distill resume {shlex.quote(str(run_dir))}"


@dataclass
class Resumption:
    """What `distill resume` runs: `distill <command> <arguments>` in the directory `cwd`."""

    command: str
    arguments: list[str]
    cwd: Path


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quoted(path: Path) -> str:
    """`path` as a quoted Hydra override value (spaces, commas and brackets stay literal).

    Hydra keeps backslashes as they are, except before a quote: those are doubled, then the quote escaped.
    """
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(path))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def resumption(run_dir: Path) -> Resumption:
    """How to continue the run in `run_dir` (a single run or one job folder of a sweep; a sweep folder:
    `sweep_resumption`).

    The command and overrides come from the folder's `.hydra/` (as Hydra recorded them), plus
    `resume=true`, `hydra.run.dir=<run_dir>` and `hydra.output_subdir=null` (the record of the
    original invocation stays as it was). It runs in the directory the run was started from, so
    relative paths in its config (teacher cache, dataset root) mean what they meant.
    """
    run_dir = Path(run_dir)
    hydra_file, overrides_file = run_dir / ".hydra" / "hydra.yaml", run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir():
        raise DistillError(f"{run_dir} is not a folder")
    if not hydra_file.is_file() or not overrides_file.is_file():
        if (run_dir / "multirun.yaml").is_file() or any(run_dir.glob("[0-9]*/.hydra/hydra.yaml")):
            return sweep_resumption(run_dir)
        raise DistillError(f"{run_dir} is not a distill run folder (no .hydra/hydra.yaml and .hydra/overrides.yaml) nor a sweep folder")
    record = _launch_record(run_dir, hydra_file, "its .hydra/ record")
    overrides = _recorded(run_dir, overrides_file, "its .hydra/ record", lambda listed: list(listed or []))
    arguments = [o for o in overrides if _key(o) != "resume"]
    arguments += [o for o in record.hydra_overrides if _key(o) not in _PLACEMENT]
    arguments += ["resume=true", f"hydra.run.dir={_quoted(run_dir.resolve())}", "hydra.output_subdir=null"]
    return Resumption(record.command, arguments, record.cwd)


# overrides that place a sweep or pick the mode: a resumed sweep sets its own (its job folders stay where they were)
_SWEEP_PLACEMENT = {"hydra.sweep.dir", "hydra.mode"}


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_resumption(sweep_dir: Path) -> Resumption:
    """How to continue the whole sweep in `sweep_dir` after a kill: its command line as `multirun.yaml` records
    it, `distill <command> -m <overrides> resume=true hydra.sweep.dir=<sweep_dir>`, run in the directory it was
    started from, with the launcher it was started with. Each job then sees `resume=true`: one that completed is
    not run again, one with a checkpoint continues from it, one never started starts (`cli._task`,
    `fused.launch_fused`). A search (hydra/sweeper=search, Optuna) is refused: re-launched, it would sample new
    trials rather than finish these (its study lives in the process that was killed)."""
    sweep_dir = Path(sweep_dir)
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        raise DistillError(
            f"{sweep_dir} has job folders but no multirun.yaml (Hydra writes it when a sweep starts), so its command "
            f"line is unknown; resume its jobs one at a time: distill resume {sweep_dir}/<n>"
        )
    record = _launch_record(sweep_dir, multirun, "its multirun.yaml")
    if record.sweeper != BASIC_SWEEPER:
        raise DistillError(
            f"{sweep_dir} is a search ({record.sweeper.rsplit('.', 1)[-1]}): re-launched it would sample new trials "
            f"instead of finishing these; resume its trials one at a time: distill resume {sweep_dir}/<n>"
        )
    arguments = ["-m", *(o for o in record.task_overrides if _key(o) != "resume")]
    arguments += [o for o in record.hydra_overrides if _key(o) not in _SWEEP_PLACEMENT]
    arguments += ["resume=true", f"hydra.sweep.dir={_quoted(sweep_dir.resolve())}"]
    return Resumption(record.command, arguments, record.cwd)


@dataclass
class LaunchRecord:
    """How Hydra recorded a launch (a run's `.hydra/hydra.yaml`, a sweep's `multirun.yaml`)."""

    command: str
    task_overrides: list[str]
    hydra_overrides: list[str]
    cwd: Path
    sweeper: str


def _read_launch(recorded: dict) -> LaunchRecord:
    """The `LaunchRecord` in Hydra's YAML record `recorded` (a run's task overrides are read from overrides.yaml)."""
    hydra = recorded["hydra"]
    overrides = hydra["overrides"]
    return LaunchRecord(
        hydra["job"]["config_name"], overrides.get("task") or [], overrides["hydra"] or [], Path(hydra["runtime"]["cwd"]),
        hydra.get("sweeper", {}).get("_target_", BASIC_SWEEPER),
    )


def _recorded(folder: Path, path: Path, what: str, read):
    """`read(<the YAML file at path>)`, or one line naming `what` (of `folder`) where it cannot be read."""
    try:
        return read(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        raise DistillError(f"{folder}: cannot read {what} ({type(error).__name__}: {error})") from None


def _launch_record(folder: Path, path: Path, what: str) -> LaunchRecord:
    """The launch Hydra recorded in `path` (of `folder`), checked: a train or kd launch, from a directory
    that still exists."""
    record = _recorded(folder, path, what, _read_launch)
    if record.command not in SUMMARY_COMMANDS:
        raise DistillError(f"{folder} is a run of {record.command!r}; distill resume continues {' and '.join(SUMMARY_COMMANDS)} runs")
    if not record.cwd.is_dir():
        raise DistillError(f"{folder} was started in {record.cwd}, which no longer exists")
    return record


def keep_obtained(error: BaseException, summary: dict) -> None:
    """Let the summary of a run that `error` stops keep what the run obtained before it (a kd run's
    teacher and baseline results, its data facts): `record_summary`'s caller reads it with `obtained`."""
    kept = {key: value for key, value in summary.items() if key not in ("status", "error")}
    error.obtained = json.loads(json.dumps(kept, default=str))  # as summary.json will hold it


def obtained(error: BaseException) -> dict:
    """What the run that `error` stopped had obtained (`keep_obtained`); empty when it kept nothing."""
    return dict(getattr(error, "obtained", None) or {})


def record_summary(command: str, cfg, run_dir: Path, summary: dict) -> None:
    """Write how a run ended into its summary.json; a disk too full for it gets a log line, not a second error."""
    try:
        write_json_atomic({"command": command, **summary, "config": to_plain(cfg)}, run_dir / "summary.json")
    except (OSError, DistillError) as error:
        log.warning(f"summary.json not written: {one_line(error)}")
