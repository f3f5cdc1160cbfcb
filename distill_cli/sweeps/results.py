"""The results of a sweep (or of several): the run folders read (`collect_jobs`), grouped by the settings
that vary and aggregated over seeds into mean +- std (`build_report`). No torch here: `distill report` starts fast.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.commands import SUMMARY_COMMANDS
from ..core.errors import DistillError, did_you_mean

# the result columns: key in report.csv/json and for --sort -> header. test acc: the student's best.pt (the
# trained model's for `distill train`), alone: the same student trained without a teacher, KD gain: the
# difference in points, teacher: the teacher's test accuracy; all on the test split; published: what the preset's
# paper published for the run's model (`published` in its summary)
RESULTS = {
    "test_acc": "test acc %",
    "published_acc": "published %",
    "alone_acc": "alone %",
    "kd_gain": "KD gain",
    "teacher_acc": "teacher %",
    "params": "params",
    "compression": "compr.",
    "speedup": "speed-up",
    "wall_time_s": "wall s",
}


# settings that never make a configuration: where a run went, how it ran
_NOT_SETTINGS = ("hydra.", "resume", "teacher_cache")


# settings by which runs are always told apart, whatever --by says: their means would mean nothing together
_ALWAYS_APART = ("command", "dataset")


FINISHED = "completed"


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Job:
    """One run folder: its settings (overrides), how it ended, and its summary when it completed."""

    run_dir: Path
    command: str
    overrides: dict[str, str]
    choices: dict[str, Any]  # config group -> option chosen (hydra.yaml)
    config: dict  # the composed config (.hydra/config.yaml)
    status: str  # completed, failed, interrupted, running, damaged
    summary: dict | None = None
    error: str | None = None
    results: dict[str, float | None] = field(default_factory=dict)
    models: str | None = None  # "teacher -> student" of a completed run

    def setting(self, key: str) -> Any:
        """The value of `key` for this run: the option of a config group, a config value, or the override as given."""
        if key == "command":
            return self.command
        if key in self.choices:
            return self.choices[key]
        value = self.config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or isinstance(value, (dict, list)):
            return self.overrides.get(key)
        return value


def job_results(summary: dict) -> dict[str, float | None]:
    """The result columns of one completed run; a `distill train` run reports the model it trained."""
    if summary["command"] == "train":
        model, teacher, baseline = summary["teacher"], {}, {}
    else:
        model, teacher, baseline = summary["student"], summary.get("teacher") or {}, summary.get("baseline") or {}
    results = {
        "test_acc": model["test_acc_best"],
        "published_acc": published_accuracy(summary),
        "alone_acc": baseline.get("test_acc_best"),
        "kd_gain": summary.get("kd_gain"),
        "teacher_acc": teacher.get("test_acc"),
        "params": model["params"],
        "compression": summary.get("compression"),
        "speedup": summary.get("speedup"),
        "wall_time_s": summary["wall_time_s"],
    }
    for name, value in results.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{name} is {value!r}")
    return results


def published_accuracy(summary: dict) -> float | None:
    """The published top-1 (a fraction, as the run's own) for the model the run reports: a train run's network, a kd
    run's student by its method (`published.kd`), or the student alone (`published.student`) where it used no teacher."""
    published = summary.get("published") or {}
    if summary["command"] == "train":
        number = published.get("teacher")
    elif published.get("method"):
        number = published.get("kd")
    else:
        number = published.get("student") if summary.get("mode") == "single" else None
    return None if number is None else number / 100


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_YAML_LOADER)


def read_job(run_dir: Path) -> Job | None:
    """The run in `run_dir` (a folder with `.hydra/`); None when it is not a train or kd run (bench)."""
    run_dir = Path(run_dir)
    try:
        hydra = _load_yaml(run_dir / ".hydra" / "hydra.yaml")["hydra"]
        command, choices = hydra["job"]["config_name"], dict(hydra["runtime"]["choices"])
        listed = _load_yaml(run_dir / ".hydra" / "overrides.yaml") or []
        config = _load_yaml(run_dir / ".hydra" / "config.yaml") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        return Job(run_dir, "?", {}, {}, {}, "damaged", error=f".hydra/ unreadable ({type(error).__name__})")
    if command not in SUMMARY_COMMANDS:
        return None
    overrides = dict(_split_override(o) for o in listed)
    overrides = {key: value for key, value in overrides.items() if not key.startswith(_NOT_SETTINGS)}
    job = Job(run_dir, command, overrides, choices, config, status="running")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        job.error = "no summary.json: still running, or stopped without a word (distill resume it)"
        return job
    try:
        job.summary = json.loads(summary_file.read_text())
        job.status = job.summary["status"]
        if job.status == FINISHED:
            job.results, job.models = job_results(job.summary), models_of(job.summary)
        else:
            job.error = job.summary.get("error")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        job.status, job.summary = "damaged", None
        job.error = f"summary.json unreadable ({type(error).__name__}: {error})"
    return job


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def job_folders(folder: Path) -> list[Path]:
    """The run folders in `folder` (itself, the jobs of a sweep, or every run under `outputs/`), in order."""
    if (folder / ".hydra").is_dir():
        return [folder]
    found = []
    for child in sorted(folder.iterdir(), key=_natural):
        if child.is_dir() and not child.name.startswith("."):
            found += job_folders(child)
    return found


def _natural(path: Path) -> tuple:
    """Job folders 0, 1, ..., 10 in numeric order."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name))


def collect_jobs(folders: list[Path]) -> list[Job]:
    """Every train/kd run in `folders`, each once (`outputs/` and a sweep in it overlap); a DistillError
    when a folder is missing or holds none."""
    jobs: dict[Path, Job] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise DistillError(f"{folder} is not a folder")
        found = [job for job in map(read_job, job_folders(folder)) if job is not None]
        if not found:
            raise DistillError(f"no distill train/kd runs in {folder}")
        jobs.update((job.run_dir.resolve(), job) for job in found if job.run_dir.resolve() not in jobs)
    return list(jobs.values())


@dataclass
class Stat:
    """Mean and sample standard deviation (None below 2 values) over the seeds of one configuration."""

    mean: float | None
    std: float | None
    n: int
    values: list[float]


def summarize(values: list[float | None]) -> Stat:
    present = [v for v in values if v is not None]
    mean = statistics.mean(present) if present else None
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(mean, std, len(present), present)


@dataclass
class Row:
    """One configuration: its settings, its runs, and the statistics of those that completed."""

    config: dict[str, Any]
    jobs: list[Job]
    stats: dict[str, Stat]

    @property
    def completed(self) -> list[Job]:
        return [job for job in self.jobs if job.status == FINISHED]

    @property
    def unfinished(self) -> Counter:
        return Counter(job.status for job in self.jobs if job.status != FINISHED)


def _varies(jobs: list[Job], key: str) -> bool:
    return len({job.setting(key) for job in jobs}) > 1


def grouping_keys(jobs: list[Job], by: list[str] | None = None) -> list[str]:
    """The settings that make a configuration: `by`, else every override that varies except `seed`;
    the command and the dataset too whenever they vary (their runs are never averaged together)."""
    if by is None:
        overridden = list(dict.fromkeys(key for job in jobs for key in job.overrides))
        keys = [key for key in overridden if key != "seed" and _varies(jobs, key)]
    else:
        known = {key for job in jobs for key in job.overrides} | {key for job in jobs for key in job.choices}
        for key in by:
            if all(job.setting(key) is None for job in jobs):
                raise DistillError(f"--by {key}: no run has this setting; {did_you_mean(key, known | {'command'})}")
        keys = list(by)
    return [key for key in _ALWAYS_APART if key not in keys and _varies(jobs, key)] + keys


def _order(value: Any) -> tuple:
    """Sorts numbers as numbers, then text, then missing values, without comparing across types."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, str(value))


def aggregate(jobs: list[Job], keys: list[str]) -> list[Row]:
    """One row per configuration (the values of `keys`), ordered by those values; only completed runs count."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.setting(key) for key in keys), []).append(job)
    rows = []
    for values, members in sorted(groups.items(), key=lambda item: [_order(v) for v in item[0]]):
        done = [job for job in members if job.status == FINISHED]
        stats = {name: summarize([job.results[name] for job in done]) for name in RESULTS}
        rows.append(Row(dict(zip(keys, values)), members, stats))
    return rows


def sort_rows(rows: list[Row], column: str, keys: list[str]) -> list[Row]:
    """Rows by a setting (ascending) or by a result column (largest first); missing values last."""
    if column in keys:
        return sorted(rows, key=lambda row: _order(row.config[column]))
    if column in RESULTS:
        return sorted(rows, key=lambda row: (row.stats[column].mean is None, -(row.stats[column].mean or 0)))
    raise DistillError(f"--sort {column}: no such column; {did_you_mean(column, [*keys, *RESULTS])}")


def models_of(summary: dict) -> str:
    """`teacher -> student` of a kd run, the model of a train run."""
    if summary["command"] == "train":
        return _name(summary["teacher"])
    if summary.get("peers"):
        return " <-> ".join(_name(peer) for peer in summary["peers"])
    teacher = summary.get("teacher")
    if not teacher:
        return f"{_name(summary['student'])} alone"
    links = [_name(link) for link in summary.get("chain", [])] or [_name(teacher)]
    generations = len(summary.get("generations", []))
    student = _name(summary["student"]) + (f" x{generations} generations" if generations else "")
    return " -> ".join([*links, student])


def _name(model: dict) -> str:
    return model.get("name") or model["arch"]  # summaries written before models had names give the architecture


@dataclass
class SweepReport:
    """The report over `folders`: the runs, the rows by configuration, and notes on what was left out."""

    folders: list[Path]
    jobs: list[Job]
    keys: list[str]
    rows: list[Row]
    datasets: list[str]
    models: list[str]
    notes: list[str]

    @property
    def title(self) -> str:
        done = sum(len(row.completed) for row in self.rows)
        return f"distill report: {', '.join(self.datasets) or '?'}, {', '.join(self.models) or '?'} ({done} of {len(self.jobs)} runs completed)"


def _describe(job: Job, keys: list[str]) -> str:
    return " ".join(f"{key}={job.setting(key)}" for key in [*keys, "seed"])


def build_report(folders: list[Path], by: list[str] | None = None, sort: str | None = None) -> SweepReport:
    """Read the runs in `folders`, group them (`by`, default: the overrides that vary) and aggregate."""
    jobs = collect_jobs(folders)
    keys = grouping_keys(jobs, by)
    rows = aggregate(jobs, keys)
    if sort:
        rows = sort_rows(rows, sort, keys)
    datasets = sorted({job.setting("dataset") for job in jobs} - {None})
    models = sorted({job.models for job in jobs if job.models})
    notes = [f"{job.status}: {job.run_dir} ({_describe(job, keys)}): {job.error or 'no error recorded'}"
             for job in jobs if job.status != FINISHED]
    if len(datasets) > 1:
        notes.insert(0, f"runs of {len(datasets)} datasets ({', '.join(datasets)}): each row is one dataset, never averaged together")
    return SweepReport([Path(f) for f in folders], jobs, keys, rows, datasets, models, notes)
