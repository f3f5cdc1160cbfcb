"""Console output: one shared Rich console, per-epoch progress, and the final results table."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

# Hydra's job logging hands this console to its RichHandler (configs/hydra/job_logging/rich.yaml),
# so log lines and progress bars share one console and do not tear each other.
# piped output (logs, CI) gets a fixed width wide enough for the results table
CONSOLE = Console(width=None if sys.stdout.isatty() else 120)


log = logging.getLogger("distill")


# "[job N] " in a job of a parallel sweep (see share_terminal), else ""
_LINE_PREFIX = ""


def share_terminal(job: int) -> None:
    """This process is job `job` of a parallel sweep (joblib, submitit local), whose jobs write to one
    terminal: no live progress bars, and each console line starts with "[job N]" (its log file does not)."""
    global _LINE_PREFIX
    _LINE_PREFIX = f"[job {job}] "


# the run folder whose lines are logged now, where one process runs several jobs (hydra/launcher=fused)
_LOGGING_RUN: ContextVar[Path | None] = ContextVar("logging_run", default=None)


@contextmanager
def logging_run(run_dir: Path) -> Iterator[None]:
    """Log lines in this block belong to the run in `run_dir` (see `job_log_files`)."""
    token = _LOGGING_RUN.set(run_dir)
    try:
        yield
    finally:
        _LOGGING_RUN.reset(token)


@contextmanager
def job_log_files(run_dirs: list[Path], name: str) -> Iterator[None]:
    """While jobs run together in this process, each job's log file `<run dir>/<name>.log` gets its own lines
    (`logging_run`) and the lines they share, in place of the root logger's log file(s)."""
    root = logging.getLogger()
    replaced = [handler for handler in root.handlers if isinstance(handler, logging.FileHandler)]
    formatter = replaced[0].formatter if replaced else logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s")
    added = []
    for run_dir in run_dirs:
        handler = logging.FileHandler(run_dir / f"{name}.log")
        handler.setFormatter(formatter)
        handler.addFilter(lambda record, run_dir=run_dir: _LOGGING_RUN.get() in (None, run_dir))
        added.append(handler)
    for handler in replaced:
        root.removeHandler(handler)
    for handler in added:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for handler in replaced:
            root.addHandler(handler)


class _FileOnFirstLine(logging.FileHandler):
    """A log file created, with its folder, when the first line comes (a command that fails early leaves none)."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@dataclass
class LibraryLog:
    """Where `library_log` wrote the libraries' lines, and how many it wrote."""

    path: Path
    lines: int = 0

    def mention(self) -> str:
        """` (torch's own warnings: <path>)` when any line was written, else ""."""
        return f" (torch's own warnings: {self.path})" if self.lines else ""


@contextmanager
def library_log(path: Path, libraries: tuple[str, ...] = ("torch", "torchao")) -> Iterator[LibraryLog]:
    """While the block runs, the log lines of `libraries` (torch's internal warnings such as `W1203 ...
    _pytree.py ...` or `No CUDA runtime is found`) and Python's warnings go to the log file `path` (created
    on the first line) instead of the console, where they would land among a command's table."""
    written = LibraryLog(Path(path))
    handler = _FileOnFirstLine(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    handler.addFilter(lambda record: setattr(written, "lines", written.lines + 1) or True)
    python_warnings = logging.getLogger("py.warnings")
    tops = [logging.getLogger(name) for name in libraries] + [python_warnings]
    children = [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
                if name.startswith(tuple(f"{library}." for library in libraries)) and isinstance(logger, logging.Logger)]
    kept = [(logger, logger.handlers[:], logger.propagate) for logger in tops + children]
    for logger in tops + children:  # torch's loggers print to stderr themselves; their other handlers stay
        printing = [handler for handler in logger.handlers if getattr(handler, "stream", None) in (sys.stderr, sys.stdout)]
        if printing or logger in tops:
            logger.handlers[:] = [h for h in logger.handlers if h not in printing] + [handler]
            logger.propagate = False

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        python_warnings.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    try:
        with warnings.catch_warnings():
            warnings.showwarning = log_warning
            yield written
    finally:
        for logger, handlers, propagate in kept:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


_SILENT = False  # a data-parallel rank other than 0: rank 0 shows the progress


def silence() -> None:
    """No live progress bars from this process."""
    global _SILENT
    _SILENT = True


def _interactive() -> bool:
    return CONSOLE.is_terminal and not os.environ.get("CI") and not _LINE_PREFIX and not _SILENT


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _LINE_PREFIX + super().format(record)


def console_handler() -> logging.Handler:
    """Rich log lines on a terminal; plain unwrapped lines when piped or under CI (see job_logging)."""
    if _interactive():
        from rich.logging import RichHandler

        handler = RichHandler(console=CONSOLE, show_time=False, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    return handler


class EpochProgress:
    """A bar over the batches of each epoch on a terminal; a plain line per epoch otherwise (or under CI)."""

    def __init__(self, label: str, epochs: int, steps_per_epoch: int):
        self.label = label
        self.epochs = epochs
        self.steps = steps_per_epoch
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "EpochProgress":
        if _interactive():
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=CONSOLE,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_epoch(self, epoch: int, done: int = 0) -> None:
        """Start the bar of `epoch`, with `done` steps already behind it (a resumed epoch)."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(
                f"{self.label} epoch {epoch}/{self.epochs}", total=self.steps, completed=done
            )

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def end_epoch(self, metrics: dict, loss_names: list[str]) -> None:
        """Log the epoch's metrics as one line (kept in the run's log file too)."""
        losses = "  ".join(f"{name} {metrics[name]:.4f}" for name in loss_names)
        val = f"  val {metrics['val_acc']:.2%}" if metrics.get("val_acc") is not None else ""
        log.info(
            f"{self.label} epoch {metrics['epoch']}/{self.epochs}  {losses}  train {metrics['train_acc']:.2%}"
            f"{val}  lr {metrics['lr']:.3g}  {metrics['images_per_s']:.0f} img/s  {metrics['seconds']:.1f}s"
        )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _model_name(entry: dict) -> str:
    """The model option the user chose, with its architecture family when that is another name
    (`resnet20 (resnet_cifar)`); summaries written before models had names give the architecture."""
    name, arch = entry.get("name") or entry["arch"], entry["arch"]
    return name if name == arch else f"{name} ({arch})"


def _row(role: str, entry: dict, columns: int, best: str = "test_acc_best") -> list[str]:
    """A table row of a network that the run did not train here (ensemble member, assistant, generation,
    peer, baseline): its role, model, test accuracy (of best.pt where it has one) and parameters."""
    params = _count(entry.get("params"))
    row = [role, _model_name(entry), _pct(entry.get(best, entry.get("test_acc"))), _pct(entry.get("test_acc_last")), params, "-"]
    return row + ["-"] * (columns - len(row))


def results_table(summary: dict) -> Table:
    """The end-of-run table: test accuracy, parameters, compression and inference speed-up; with the
    rows of each training mode (ensemble members, assistants, generations, peers)."""
    table = Table(title=f"distill {summary['command']} results ({summary['dataset']}, test split)")
    columns = ["role", "model", "test acc (best)", "test acc (last)", "params", "compression"]
    speed = summary.get("speedup") is not None
    if speed:
        columns += ["infer img/s", "speed-up"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("role", "model") else "right")
    teacher, student = summary.get("teacher"), summary.get("student")
    if teacher:
        row = [
            # a kd run reports the one teacher checkpoint it used under "test_acc"; a train run says what it
            # trained the network as (a teacher, or kd's baseline: the student alone)
            summary.get("role", "teacher"), _model_name(teacher), _pct(teacher.get("test_acc", teacher.get("test_acc_best"))),
            _pct(teacher.get("test_acc_last")), _count(teacher["params"]), "1.0x",
        ]
        if speed:
            row += [f"{teacher['inference_images_per_s']:,.0f}", "1.0x"]
        table.add_row(*row)
        for index, member in enumerate(teacher.get("members", []), 1):
            table.add_row(*_row(f"  member {index} (weight {member['weight']:.2f})", member, len(columns)))
    for link in summary.get("chain", [])[1:]:
        table.add_row(*_row(link["role"], link, len(columns)))
    for generation in summary.get("generations", [])[:-1]:
        table.add_row(*_row(f"generation {generation['generation']}", generation, len(columns)))
    for peer in summary.get("peers", []):  # mutual learning: every peer is a student, the first one is "student"
        table.add_row(*_row(peer["peer"], peer, len(columns)))
        if peer.get("baseline"):
            table.add_row(*_row(f"{peer['peer']} alone", {**peer["baseline"], "params": peer["params"]}, len(columns)))
    if student and not summary.get("peers"):
        compression = summary.get("compression")
        role = f"generation {len(summary['generations'])}" if summary.get("generations") else "student"
        row = [
            role, _model_name(student), _pct(student["test_acc_best"]), _pct(student["test_acc_last"]),
            _count(student["params"]), "-" if compression is None else f"{compression:.1f}x",
        ]
        if speed:
            row += [f"{student['inference_images_per_s']:,.0f}", f"{summary['speedup']:.1f}x"]
        table.add_row(*row)
    baseline = summary.get("baseline")
    if baseline:
        if not summary.get("peers"):
            row = ["student alone", _model_name(baseline), _pct(baseline["test_acc_best"]), "-", _count(student["params"]), "-"]
            table.add_row(*row, *(["-", "-"] if speed else []))
        table.caption = f"KD gain over the same student trained alone: {100 * summary['kd_gain']:+.2f} points (best.pt)"
    ensemble = summary.get("generations_ensemble")
    if ensemble:
        table.add_row(*_row(f"ensemble of the {ensemble['members']} generations", {"name": "-", "arch": "-", **ensemble}, len(columns)))
    for line in (_top5_line(summary), published_line(summary)):
        if line:
            table.caption = f"{table.caption}\n{line}" if table.caption else line
    return table


def published_line(summary: dict) -> str:
    """The caption line that sets the preset's published top-1 (`summary["published"]`) beside this run's:
    `published (CRD's table, 240 epochs): teacher 79.42% (here 79.10%), student alone 72.50% (here 72.31%), kd
    73.33% (here 73.02%)`, then what of this run differs from the published recipe; empty without numbers."""
    published = summary.get("published")
    if not published:
        return ""
    teacher, student, baseline = summary.get("teacher"), summary.get("student"), summary.get("baseline")
    entries = [
        (summary.get("role", "teacher"), published.get("teacher"), teacher and teacher.get("test_acc", teacher.get("test_acc_best"))),
        ("student alone", published.get("student"), baseline and baseline["test_acc_best"]),
        (published.get("method"), published.get("kd"), student and student["test_acc_best"]),
    ]
    parts = [f"{name} {number:.2f}%{'' if here is None else f' (here {_pct(here)})'}" for name, number, here in entries if number is not None]
    if not parts:
        return ""
    recipe = ", ".join(filter(None, [published.get("source"), published.get("epochs") and f"{published['epochs']} epochs"]))
    line = f"published{f' ({recipe})' if recipe else ''}: {', '.join(parts)}"
    if published.get("differs"):
        line += f"; this run: {', '.join(published['differs'])}"
    return line


def _top5_line(summary: dict) -> str:
    """The caption line `top-5 test acc: teacher 91.20%, student 89.10%, student alone 88.00%` of the networks whose
    top-5 was measured (100+ classes); empty where none was."""
    entries = [(summary.get("role", "teacher"), summary.get("teacher")), ("student", summary.get("student")), ("student alone", summary.get("baseline"))]
    parts = [
        f"{role} {_pct(entry.get('test_acc_top5', entry.get('test_acc_top5_best')))}"
        for role, entry in entries
        if entry and ("test_acc_top5" in entry or "test_acc_top5_best" in entry)
    ]
    return f"top-5 test acc: {', '.join(parts)}" if parts else ""


def per_class_table(summary: dict) -> Table:
    """Test accuracy per class for teacher and student; classes left out of the transfer set are marked."""
    excluded = set(summary.get("exclude_classes") or [])
    models = [(role, summary[role]) for role in ("teacher", "student") if summary.get(role)]
    table = Table(title="test accuracy per class")
    table.add_column("class")
    for role, _ in models:
        table.add_column(summary.get("role", role) if role == "teacher" else role, justify="right")
    class_names = list(models[0][1]["test_acc_per_class"])
    for index, name in enumerate(class_names):
        label = f"{name} (not in transfer set)" if index in excluded else name
        table.add_row(label, *(_pct(model["test_acc_per_class"][name]) for _, model in models))
    return table


def print_results(summary: dict, per_class: bool = False) -> None:
    """The results table, and the per-class table when asked or when classes were excluded."""
    CONSOLE.print(results_table(summary))
    if per_class or summary.get("exclude_classes"):
        CONSOLE.print(per_class_table(summary))
