"""Experiment trackers beside metrics.jsonl: TensorBoard and MLflow (`logger=tensorboard`, `logger=mlflow`).

metrics.jsonl stays the record of truth; a tracker receives each epoch once last.pt holds it, and the
summary at the end. Their packages are optional extras, imported when a run asks for them. A tracker
that fails mid-run is dropped with one warning; training goes on. `<run dir>/tracker.json` keeps the
run's name and MLflow run id, so that a resumed run continues the same tracker runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..core.checkpoint import BEST
from ..core.config import RunConfig, to_plain
from ..core.errors import DistillError
from ..core.files import write_json_atomic

log = logging.getLogger("distill")


# config echoes and per-class tables: not among the summary's metrics
_NOT_METRICS = {"test_acc_per_class", "data", "kwargs", "loss", "seed", "epochs", "T", "alpha", "exclude_classes"}


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary's numbers (test accuracies, KD gain, parameters, compression, speed-up, ...), flat."""
    return {
        key: float(value)
        for key, value in flatten(summary).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not set(key.split(".")) & _NOT_METRICS
    }


def _epoch_scalars(metrics: dict) -> dict[str, float]:
    """A metrics.jsonl row's values (every loss term, accuracies, lr, images/s), without the epoch and nulls."""
    return {key: value for key, value in metrics.items() if key != "epoch" and value is not None}


def _require(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise DistillError(f"logger={package} needs the {package} package: pip install 'distill-cli[{package}]'") from None


class Tracker:
    """One tracker of a run; `Trackers` calls it."""

    def start(self, history: list[dict]) -> None:
        """Before the first epoch; `history` holds the epochs a resumed run's last.pt has done."""

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        raise NotImplementedError

    def log_summary(self, summary: dict) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        """`status`: FINISHED, FAILED or KILLED."""


class TensorBoard(Tracker):
    """Scalars per epoch (step = epoch) and the summary as hparams, in `<run dir>/tb/<run name>/`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, command: str, record: dict):
        _require("tensorboard")
        self.dir = run_dir / "tb" / re.sub(r"[^\w=,.+-]", "_", record["name"])
        self.config = flatten(to_plain(cfg))
        self.writer = None

    def start(self, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # epochs are logged after last.pt, so a resumed run may lack its last epoch: purge from it, log it again
        self.writer = SummaryWriter(str(self.dir), purge_step=history[-1]["epoch"] if history else None)
        for row in history[-1:]:
            self.log_epoch(row, row["epoch"])

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        for tag, value in _epoch_scalars(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def log_summary(self, summary: dict) -> None:
        """The config as hparams and the summary's numbers as their metrics, in this run (add_hparams
        would write them to a sub-run of their own)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = summary_metrics(summary)
        values = {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in self.config.items()}
        for part in hparams(values, metrics):
            self.writer.file_writer.add_summary(part)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


class MLflow(Tracker):
    """A run in `logger.tracking_uri`: params = the config, tags, metrics per epoch (step = epoch), the
    summary as final metrics, best.pt and summary.json as artifacts."""

    def __init__(self, cfg: RunConfig, run_dir: Path, command: str, record: dict):
        mlflow = _require("mlflow")
        from mlflow.entities import Param

        self.run_dir = run_dir
        database = _sqlite_path(cfg.logger.tracking_uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        # parallel sweep jobs: one creates the SQLite store and the experiment, the others wait
        with _file_lock(database) if database is not None else nullcontext():
            self.client = mlflow.MlflowClient(cfg.logger.tracking_uri)
            if "mlflow_run_id" in record:
                self.run_id = record["mlflow_run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment = self.client.get_experiment_by_name(record["experiment"])
            if experiment is None:
                # a SQLite store keeps artifacts beside it (MLflow's default is ./mlruns of the current directory)
                artifacts = (database.resolve().parent / "mlartifacts").as_uri() if database is not None else None
                experiment_id = self.client.create_experiment(record["experiment"], artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
        student = getattr(cfg, "student", None)
        tags = {"command": command, "dataset": cfg.dataset.name, "teacher": cfg.teacher.label}
        if student is not None:
            tags["student"] = student.label
        self.run_id = record["mlflow_run_id"] = self.client.create_run(experiment_id, tags=tags, run_name=record["name"]).info.run_id
        params = [Param(key, str(value)) for key, value in flatten(to_plain(cfg)).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[first : first + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def start(self, history: list[dict]) -> None:
        # epochs are logged after last.pt: log what a resumed run's MLflow run lacks
        logged = {metric.step for metric in self.client.get_metric_history(self.run_id, "lr")}
        for row in history:
            if row["epoch"] not in logged:
                self.log_epoch(row, row["epoch"])

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        self._log_metrics(_epoch_scalars(metrics), epoch)

    def log_summary(self, summary: dict) -> None:
        self._log_metrics(summary_metrics(summary), summary["epochs"])
        for name in (BEST, "summary.json"):
            self.client.log_artifact(self.run_id, str(self.run_dir / name))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _file_lock(database: Path):
    from filelock import FileLock

    return FileLock(f"{database}.lock")


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow}


class Trackers:
    """The run's trackers as one: a tracker that raises is dropped with one warning (metrics.jsonl,
    written first, keeps every epoch) and the run goes on."""

    def __init__(self, trackers: dict[str, Tracker]):
        self.trackers = trackers

    def _call(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                del self.trackers[name]
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                log.warning(f"logger={name} failed ({type(error).__name__}: {reason}); no longer logging to it, metrics.jsonl has every epoch")

    def start(self, history: list[dict]) -> None:
        self._call("start", history)

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        self._call("log_epoch", metrics, epoch)

    def log_summary(self, summary: dict) -> None:
        self._call("log_summary", summary)

    def close(self, status: str) -> None:
        self._call("close", status)


def _job_names(command: str) -> dict:
    """A fresh run's name and MLflow experiment: in a sweep, the job's overrides of the keys the sweep varies
    (`seed=1,T=4`) in an experiment named by the sweep's folder; alone (or where nothing varies), its
    overrides; the command where there are none. Paths in a name are cut to their last two parts (the full
    config is in the run's params)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"name": command, "experiment": command}
    hydra = HydraConfig.get()
    # what sets this job apart: not resume=, nor the trackers' own settings
    overrides = [o for o in hydra.overrides.task if not o.startswith(("resume=", "logger=", "logger."))]
    if hydra.mode != RunMode.MULTIRUN:
        return {"name": _name(overrides) or command, "experiment": command}
    varied = _swept_keys(hydra)
    varying = [o for o in overrides if _override_key(o) in varied]
    return {"name": _name(varying or overrides) or command, "experiment": hydra.sweep.dir}


def _override_key(override: str) -> str:
    """The key an override sets (`+a.b=1`, `~a.b`, `a/b=c` -> `a.b`, `a.b`, `a/b`)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _swept_keys(hydra) -> set[str]:
    """The keys a sweep varies: those of its sweep overrides (`seed=0,1,2`, `T=range(1,5)`, `choice(...)`) on
    the command line, as Hydra's sweeper saved them in `<sweep dir>/multirun.yaml`, and those of
    `hydra.sweeper.params` (a sweeper's search space: Optuna's, or the basic sweeper's). Empty when
    neither can be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = set(OmegaConf.select(hydra, "sweeper.params", default=None) or {})
    try:
        saved = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in saved])
    except Exception:  # no multirun.yaml (a sweeper that does not save one), or one Hydra cannot parse
        return keys
    return keys | {_override_key(o.input_line) for o in parsed if o.is_sweep_override() and o.input_line}


def _name(overrides: list[str]) -> str:
    """Overrides as a run name: `a=1,b=2`, a path cut to its last two parts (`teacher.checkpoint=run/best.pt`)."""
    short = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if equals and "/" in value and not value.startswith(("[", "{", "'", '"')):
            value = "/".join(Path(value).parts[-2:])
        short.append(f"{key}{equals}{value}")
    return ",".join(short)


@contextmanager
def open_trackers(cfg: RunConfig, run_dir: Path, command: str):
    """The trackers `cfg.logger` turns on, for the run in `run_dir` (only on rank 0 of a distributed run);
    a resumed run continues the tracker runs its tracker.json names. Closed with the run's outcome."""
    names = [name for name in TRACKERS if getattr(cfg.logger, name)]
    if not names or os.environ.get("RANK", "0") != "0":
        yield Trackers({})
        return
    path = run_dir / "tracker.json"
    if cfg.resume and path.is_file():
        record = json.loads(path.read_text())
    else:
        derived = _job_names(command)
        record = {"name": cfg.logger.name or derived["name"], "experiment": cfg.logger.experiment or derived["experiment"]}
    trackers = Trackers({name: TRACKERS[name](cfg, run_dir, command, record) for name in names})
    write_json_atomic(record, path)
    status = "FAILED"
    try:
        yield trackers
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        trackers.close(status)
