"""TensorBoard and MLflow beside metrics.jsonl, read back with the trackers' own readers."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    DISTILL,
    compose_config,
    on_training_step,
    read_jsonl,
    small_kd_config,
    small_train_config,
)
from mlflow import MlflowClient
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from distill_cli.core.config import LoggerConfig, to_plain, validate_config
from distill_cli.core.errors import DistillError, Interrupted, one_line
from distill_cli.core.processes import available_cpus
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.trackers import MLflow, TensorBoard, Trackers, flatten

pytestmark = pytest.mark.usefixtures("quiet_results")


def _logged(tmp_path: Path, **logger) -> LoggerConfig:
    return LoggerConfig(tensorboard=True, mlflow=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **logger)


@pytest.fixture(scope="module")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables and nothing else (MLflow's migrations take seconds per new store)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    return store


@pytest.fixture
def mlflow_store(tmp_path, empty_mlflow_store) -> None:
    """The store `_logged(tmp_path)` names, made in advance (a copy of the empty one); the sweep test
    leaves making its store to the tracker."""
    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")


def _tensorboard(run_dir: Path) -> EventAccumulator:
    (folder,) = (run_dir / "tb").iterdir()  # one TensorBoard run per job
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _mlflow(tmp_path: Path, run_dir: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(json.loads((run_dir / "tracker.json").read_text())["mlflow_run_id"])


def _epoch_values(run_dir: Path) -> dict[str, list]:
    """metrics.jsonl as {key: [(epoch, value), ...]}: what each tracker must hold per epoch."""
    values = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if key != "epoch" and value is not None:
                values.setdefault(key, []).append((row["epoch"], value))
    return values


def _assert_epochs_match(tmp_path: Path, run_dir: Path) -> None:
    """Both trackers hold exactly metrics.jsonl: one value per key and epoch, no more, no fewer."""
    expected = _epoch_values(run_dir)
    assert {"loss", "train_acc", "val_acc", "lr", "images_per_s"} <= set(expected)
    events = _tensorboard(run_dir)
    client, run = _mlflow(tmp_path, run_dir)
    for key, values in expected.items():
        board = [(event.step, event.value) for event in events.Scalars(key)]
        assert board == [(epoch, pytest.approx(value, rel=1e-6)) for epoch, value in values]  # float32 events
        assert [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key)] == values


@pytest.mark.usefixtures("mlflow_store")
def test_trackers_hold_every_epoch_the_config_and_the_summary(tmp_path):
    cfg = small_train_config(tmp_path, logger=_logged(tmp_path))
    run_dir = tmp_path / "run"
    summary = run_train(cfg, run_dir)
    _assert_epochs_match(tmp_path, run_dir)

    client, run = _mlflow(tmp_path, run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params == {key: str(value) for key, value in flatten(to_plain(cfg)).items()}
    assert {k: run.data.tags[k] for k in ("command", "dataset", "teacher")} == {"command": "train", "dataset": "digits", "teacher": "cnn"}
    for key in ("teacher.test_acc_best", "teacher.test_acc_last", "teacher.params", "teacher.best_epoch"):
        *_, name = key.split(".")
        assert run.data.metrics[key] == summary["teacher"][name]
    assert "teacher.test_acc_per_class.0" not in run.data.metrics
    assert {artifact.path for artifact in client.list_artifacts(run.info.run_id)} == {"best.pt", "summary.json"}

    # the HParams view: the config's values and the summary's metrics, in the same run as the epochs
    events = _tensorboard(run_dir)
    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["seed"].number_value == 0 and start.hparams["teacher.arch"].string_value == "cnn"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert "teacher.test_acc_best" in metrics and metrics <= set(events.Tags()["scalars"])
    assert events.Scalars("teacher.test_acc_best")[-1].value == pytest.approx(summary["teacher"]["test_acc_best"])


@pytest.mark.usefixtures("mlflow_store")
def test_kd_is_one_mlflow_run_and_its_teacher_and_baseline_have_tensorboard_runs(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_kd(small_kd_config(tmp_path, logger=_logged(tmp_path)), run_dir)
    _assert_epochs_match(tmp_path, run_dir)
    client, run = _mlflow(tmp_path, run_dir)
    assert (run.data.tags["command"], run.data.tags["student"]) == ("kd", "mlp")
    for key in ("kd_gain", "compression", "student.test_acc_best", "baseline.test_acc_best", "teacher.test_acc"):
        assert key in run.data.metrics
    assert run.data.metrics["kd_gain"] == summary["kd_gain"]
    every_experiment = [experiment.experiment_id for experiment in client.search_experiments()]
    assert [found.info.run_id for found in client.search_runs(every_experiment)] == [run.info.run_id]
    for part in ("teacher", "baseline"):
        assert _tensorboard(run_dir / part).Scalars("loss")[-1].step == 2


def _interrupt_mid_epoch(monkeypatch):
    """SIGTERM in step 5 of epoch 2: last.pt holds epoch 1 and part of epoch 2."""

    def interrupt(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    on_training_step(monkeypatch, 25, interrupt)


def _interrupt_before_trackers(monkeypatch):
    """Killed once last.pt holds epoch 2, before the trackers got it."""
    real = Trackers.log_epoch

    def log_epoch(self, metrics, epoch):
        if epoch == 2:
            raise Interrupted(signal.SIGTERM)
        real(self, metrics, epoch)

    monkeypatch.setattr(Trackers, "log_epoch", log_epoch)


@pytest.mark.usefixtures("mlflow_store")
@pytest.mark.parametrize("interrupt", [_interrupt_mid_epoch, _interrupt_before_trackers], ids=["mid-epoch", "before-trackers"])
def test_resume_continues_the_tracker_runs_with_one_value_per_epoch(tmp_path, monkeypatch, interrupt):
    cfg = small_train_config(tmp_path, epochs=3, logger=_logged(tmp_path))
    run_dir = tmp_path / "run"
    interrupt(monkeypatch)
    with pytest.raises(Interrupted):
        run_train(cfg, run_dir)
    monkeypatch.undo()
    client, run = _mlflow(tmp_path, run_dir)
    assert run.info.status == "KILLED"

    run_train(replace(cfg, resume=True), run_dir)
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    _assert_epochs_match(tmp_path, run_dir)
    client, resumed = _mlflow(tmp_path, run_dir)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.usefixtures("mlflow_store")
@pytest.mark.parametrize("tracker", [TensorBoard, MLflow], ids=["tensorboard", "mlflow"])
def test_a_tracker_failing_mid_run_warns_once_and_training_completes(tmp_path, monkeypatch, caplog, tracker):
    real = tracker.log_epoch

    def log_epoch(self, metrics, epoch):
        if epoch >= 2:
            raise OSError(28, "No space left on device")
        real(self, metrics, epoch)

    monkeypatch.setattr(tracker, "log_epoch", log_epoch)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="distill"):
        summary = run_train(small_train_config(tmp_path, epochs=3, logger=_logged(tmp_path)), run_dir)
    name = {TensorBoard: "tensorboard", MLflow: "mlflow"}[tracker]
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"logger={name} failed (OSError:")
    assert summary["status"] == "completed"
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    if tracker is TensorBoard:  # the other tracker goes on
        client, run = _mlflow(tmp_path, run_dir)
        assert [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    else:
        assert [event.step for event in _tensorboard(run_dir).Scalars("loss")] == [1, 2, 3]


@pytest.mark.parametrize("package", ["tensorboard", "mlflow"])
def test_a_missing_tracker_package_stops_at_start_up_naming_the_extra(tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(DistillError) as error:
        run_train(small_train_config(tmp_path, logger=_logged(tmp_path)), tmp_path / "run")
    assert one_line(error.value) == f"logger={package} needs the {package} package: pip install 'distill-cli[{package}]'"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run_train(small_train_config(tmp_path, epochs=1, logger=_logged(tmp_path)), tmp_path / "run")
    assert not (tmp_path / "run" / "tb").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["train", "kd"])
def test_logger_options_compose(command):
    def logger(choice: str) -> tuple[bool, bool]:
        cfg = validate_config(command, compose_config(command, [f"logger={choice}"] if choice else []))
        return cfg.logger.tensorboard, cfg.logger.mlflow

    assert logger("") == logger("none") == (False, False)
    assert (logger("tensorboard"), logger("mlflow"), logger("[tensorboard,mlflow]")) == ((True, False), (False, True), (True, True))
    with pytest.raises(Exception) as error:
        compose_config(command, ["logger=nosuch"])
    assert one_line(error.value) == "logger=nosuch: no such logger option; choose from: mlflow, none, tensorboard"


@pytest.mark.slow
def test_a_joblib_sweep_shares_the_cores_and_logs_one_mlflow_run_per_job_named_by_what_varies(tmp_path):
    """Two jobs at once in worker processes, started from a shell that gives every process all the cores
    (OMP_NUM_THREADS and MKL_NUM_THREADS, which joblib passes on where the shell sets them): each job trains
    with its share, says so, and makes its own MLflow run in the new store (the first makes its tables),
    named by what the sweep varies (not the absolute teacher_cache path), with every epoch of its
    metrics.jsonl."""
    cores = available_cpus()
    store = tmp_path / "mlflow.db"
    result = subprocess.run(
        [str(DISTILL), "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "logger=[tensorboard,mlflow]",
         f"logger.tracking_uri=sqlite:///{store}", "seed=1,2", "epochs=2", "teacher.kwargs.width=4", "device=cpu",
         f"teacher_cache={tmp_path / 'cache'}"],
        cwd=tmp_path, env={**os.environ, "CI": "1", "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/[01]"))
    share = max(1, cores // 2)
    assert [json.loads((job / "summary.json").read_text())["threads"] for job in jobs] == [share, share]
    assert f"[job 0] device.threads={share}: the {cores} cores split among the 2 jobs" in result.stdout
    assert [[folder.name for folder in (job / "tb").iterdir()] for job in jobs] == [["seed=1"], ["seed=2"]]
    client = MlflowClient(f"sqlite:///{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == str(jobs[0].parent.relative_to(tmp_path))
    assert sorted(run.info.run_name for run in client.search_runs([experiment.experiment_id])) == ["seed=1", "seed=2"]
    for job in jobs:
        _assert_epochs_match(tmp_path, job)


def test_runs_are_named_by_what_the_sweep_varies_with_paths_cut_short(tmp_path, monkeypatch):
    """A job's name: the overrides of the keys its sweep varies (on the command line as saved in multirun.yaml,
    or in hydra.sweeper.params); a single run: its overrides, with paths cut to their last two parts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from distill_cli.training import trackers

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    checkpoint = "teacher.checkpoint=/work/runs/2026-12-01/teacher/best.pt"
    command_line = ["T=2,4", "alpha=range(0.5,1,0.25)", "loss=choice(kd,dkd)", "+seed=0", checkpoint, "epochs=3", "logger=mlflow"]
    OmegaConf.save({"hydra": {"overrides": {"task": command_line}}}, sweep / "multirun.yaml")
    job = ["T=4", "alpha=0.75", "loss=dkd", "+seed=0", checkpoint, "epochs=3", "logger=mlflow"]

    def names(mode, task, params=None):
        hydra = OmegaConf.create({"mode": mode, "overrides": {"task": task}, "sweep": {"dir": str(sweep)}, "sweeper": {"params": params}})
        monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
        return trackers._job_names("kd")

    assert names(RunMode.MULTIRUN, job) == {"name": "T=4,alpha=0.75,loss=dkd", "experiment": str(sweep)}
    assert names(RunMode.MULTIRUN, job, params={"epochs": "3,6"})["name"] == "T=4,alpha=0.75,loss=dkd,epochs=3"
    assert names(RunMode.RUN, job) == {"name": "T=4,alpha=0.75,loss=dkd,+seed=0,teacher.checkpoint=teacher/best.pt,epochs=3", "experiment": "kd"}
    assert names(RunMode.RUN, ["logger=mlflow"])["name"] == "kd"
    (sweep / "multirun.yaml").unlink()  # a sweeper that saves none, and no params: every override names the job
    assert names(RunMode.MULTIRUN, job)["name"] == "T=4,alpha=0.75,loss=dkd,+seed=0,teacher.checkpoint=teacher/best.pt,epochs=3"

_KEYS = ("loss", "train_acc", "val_acc", "lr", "images_per_s")


def _log_as_job(job: int, store: Path, epochs: int, barrier, failures) -> None:
    """One sweep job's MLflow tracker (in a forked process): made, then each epoch and the summary logged at
    the same moment as the other jobs' (a barrier before each); an error goes to `failures`."""
    try:
        cfg = small_train_config(store.parent, logger=LoggerConfig(mlflow=True, tracking_uri=f"sqlite:///{store}"))
        run_dir = store.parent / str(job)
        run_dir.mkdir()
        (run_dir / "best.pt").write_bytes(b"weights")
        (run_dir / "summary.json").write_text("{}")
        barrier.wait(120)
        tracker = MLflow(cfg, run_dir, "train", {"name": f"seed={job}", "experiment": "sweep"})
        tracker.start([])
        for epoch in range(1, epochs + 1):
            barrier.wait(120)
            tracker.log_epoch({"epoch": epoch, **{key: float(100 * job + epoch) for key in _KEYS}}, epoch)
        barrier.wait(120)
        tracker.log_summary({"epochs": epochs, "teacher": {"test_acc": job / 10}})
        tracker.close("FINISHED")
    except BaseException as error:  # noqa: BLE001 - whatever it is, the test names it
        barrier.abort()  # the other jobs stop waiting for this one
        failures.put(f"job {job}: {type(error).__name__}: {one_line(error)}")
        raise


@pytest.mark.parametrize("store_made", [True, False], ids=["store-made", "store-new"])
def test_parallel_jobs_log_to_one_sqlite_store_at_the_same_moments(tmp_path, empty_mlflow_store, store_made):
    """Four processes make their runs in one store (made before, or new: the first job makes its tables, with
    MLflow's migrations taking seconds) and log each epoch at the same moment: no "database is locked" nor a
    race, one run per job, every value of every epoch there."""
    import multiprocessing

    jobs, epochs, store = 4, 5, tmp_path / "mlflow.db"
    if store_made:
        shutil.copyfile(empty_mlflow_store, store)
    context = multiprocessing.get_context("fork")  # MLflow is imported already; spawned processes would import it again
    barrier, failures = context.Barrier(jobs), context.Queue()
    processes = [context.Process(target=_log_as_job, args=(job, store, epochs, barrier, failures)) for job in range(jobs)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        process.kill()  # a no-op unless it hangs
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == [] and [process.exitcode for process in processes] == [0] * jobs
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"seed={job}" for job in range(jobs)]
    for run in runs:
        job = int(run.info.run_name.removeprefix("seed="))
        assert run.info.status == "FINISHED" and run.data.metrics["teacher.test_acc"] == job / 10
        for key in _KEYS:
            history = [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key)]
            assert sorted(history) == [(epoch, 100 * job + epoch) for epoch in range(1, epochs + 1)]
