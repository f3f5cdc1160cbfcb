"""`distill resume <sweep dir>`: a whole sweep continued after a kill, with the launcher it was started with
(core.run_folders.sweep_resumption, cli.main._task, sweeps.fused_launcher._resumed_key): completed jobs are not run again, the others continue
or start, and every job ends with the metrics of the sweep run without the kill."""

import json
import os
import signal
import subprocess
from functools import partial

import pytest
import yaml
from conftest import (
    DISTILL,
    FAST_KD,
    comparable_results,
    distill_in_process,
    metrics_without_timing,
    on_training_step,
)

import distill_cli.sweeps.callbacks as callbacks
import distill_cli.sweeps.fused_launcher as fused
from distill_cli.core.run_folders import BASIC_SWEEPER, resumption

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quiet_results", "no_plots")]

# 6 jobs; fused: 2 groups of 3 (one per dropout: dropout draws from each student's RNG stream), one teacher
GRID = ["student.kwargs.dropout=0.1,0.2", "T=2,4,8"]

# the fault injection of the killed sweep: SIGKILL right after the KILL_AFTER_SAVES-th last.pt written
KILL = '''
import os
import signal

if "KILL_AFTER_SAVES" in os.environ:
    import distill_cli.training.loop as loop

    save_last, saves = loop.save_last, []

    def save_then_kill(checkpoint, run_dir):
        save_last(checkpoint, run_dir)
        saves.append(run_dir)
        if len(saves) == int(os.environ["KILL_AFTER_SAVES"]):
            os.kill(os.getpid(), signal.SIGKILL)

    loop.save_last = save_then_kill
'''


def _recipe(root) -> list[str]:
    """Tiny augmented digits kd jobs sharing one teacher cache under `root`."""
    return [*FAST_KD, "dataset.augment=true", "baseline=false", "device.type=cpu", "device.threads=1", f"teacher_cache={root / 'cache'}"]


def _report_without_plots(monkeypatch) -> None:
    """The sweep report of each sweep without its plots (seconds of matplotlib that these tests do not check)."""
    monkeypatch.setattr(callbacks, "write_report", partial(callbacks.write_report, plots=False))


@pytest.fixture
def no_plots(monkeypatch):
    _report_without_plots(monkeypatch)


def _summary(job) -> dict:
    return json.loads((job / "summary.json").read_text())


def _assert_as_uninterrupted(sweep, reference, same: dict[int, int]) -> None:
    """Job n of `sweep` has the metrics and student results of job `same[n]` of the `reference` sweep."""
    for n, m in same.items():
        assert metrics_without_timing(sweep / str(n)) == metrics_without_timing(reference / str(m)), n
        assert comparable_results(_summary(sweep / str(n)))["student"] == comparable_results(_summary(reference / str(m)))["student"], n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fused sweep of GRID run without a kill (it trains the teacher into the cache the others use)."""
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _report_without_plots(monkeypatch)
        monkeypatch.chdir(root)
        args = ["kd", "-m", "hydra/launcher=fused", "hydra.launcher.batching=sequential", *GRID, *_recipe(root), f"hydra.sweep.dir={root / 'reference'}"]
        assert distill_in_process(monkeypatch, *args) == 0
    return root / "reference"


def test_a_killed_fused_sweep_resumes_to_the_metrics_of_the_sweep_never_killed(reference, monkeypatch):
    root = reference.parent
    sweep = root / "killed"
    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(KILL)
    env = {**os.environ, "CI": "1", "KILL_AFTER_SAVES": "8", "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "inject"), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["kd", "-m", "hydra/launcher=fused", "hydra.launcher.batching=sequential", *GRID, *_recipe(root), f"hydra.sweep.dir={sweep}"]
    killed = subprocess.run([str(DISTILL), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    # group 1 (jobs 0-2) completed: 6 saves; group 2 saved epoch 1 of jobs 3 and 4, killed before job 5's save
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [(sweep / str(n) / "summary.json").is_file() for n in range(3)] == [True] * 3
    assert [(sweep / str(n) / "last.pt").is_file() for n in range(3, 6)] == [True, True, False]
    completed = {n: (sweep / str(n) / "summary.json").stat().st_mtime_ns for n in range(3)}
    before = [resumption(sweep), resumption(sweep / "3")]

    groups = []
    run_kd_fused = fused.run_kd_fused
    monkeypatch.setattr(fused, "run_kd_fused", lambda cfgs, run_dirs, *rest: groups.append([d.name for d in run_dirs]) or run_kd_fused(cfgs, run_dirs, *rest))
    monkeypatch.chdir(root / "inject")  # from elsewhere, a relative path: the sweep runs again where it was started
    assert distill_in_process(monkeypatch, "resume", "../killed") == 0
    assert groups == [["3", "4"]]  # job 5 (no last.pt: from scratch) is at another position: alone
    assert {n: (sweep / str(n) / "summary.json").stat().st_mtime_ns for n in range(3)} == completed  # not run again
    for n in (3, 4):
        assert "student: resuming after epoch 1\n" in (sweep / str(n) / "kd.log").read_text()
    assert "resuming" not in (sweep / "5" / "kd.log").read_text()
    _assert_as_uninterrupted(sweep, reference, {n: n for n in range(6)})
    assert [resumption(sweep), resumption(sweep / "3")] == before  # the records the re-launch wrote resume as the first did
    report = json.loads((sweep / "report.json").read_text())  # the sweep report counts every job
    assert sum(row["n"] for row in report["rows"]) == 6


def test_a_sweep_of_the_basic_launcher_stopped_mid_job_resumes(reference, monkeypatch):
    root = reference.parent
    monkeypatch.chdir(root)
    sweep = root / "basic"
    args = ["kd", "-m", "student.kwargs.dropout=0.1", "T=2,4,8", *_recipe(root), f"hydra.sweep.dir={sweep}"]  # reference jobs 0-2
    on_training_step(monkeypatch, 2 * 20 + 25, lambda parts: os.kill(os.getpid(), signal.SIGTERM) or parts, factory="kd_step")
    assert distill_in_process(monkeypatch, *args) == 128 + signal.SIGTERM  # job 1, epoch 2, step 5 (20 steps an epoch)
    assert not (sweep / "2").exists()
    report = json.loads((sweep / "report.json").read_text())  # what finished, reported although Hydra's callback never ran
    assert [job["status"] for job in report["jobs"]] == ["completed", "interrupted"] and report["rows"][0]["n"] == 1
    completed = (sweep / "0" / "summary.json").stat().st_mtime_ns
    monkeypatch.undo()
    _report_without_plots(monkeypatch)
    monkeypatch.chdir(root)
    assert distill_in_process(monkeypatch, "resume", str(sweep)) == 0
    assert (sweep / "0" / "summary.json").stat().st_mtime_ns == completed
    assert "student: resuming after epoch 1 and 5 steps of epoch 2" in (sweep / "1" / "kd.log").read_text()
    _assert_as_uninterrupted(sweep, reference, {0: 0, 1: 1, 2: 2})
    assert [job["status"] for job in json.loads((sweep / "report.json").read_text())["jobs"]] == ["completed"] * 3


def _multirun(sweep, cwd, sweeper: str = BASIC_SWEEPER) -> None:
    """A sweep folder whose multirun.yaml records `distill kd -m T=2,4 batch_size=100000` (jobs that fail at
    once) started in `cwd`."""
    sweep.mkdir()
    record = {"hydra": {"job": {"config_name": "kd"}, "runtime": {"cwd": str(cwd)}, "sweeper": {"_target_": sweeper},
                        "overrides": {"task": ["T=2,4", "batch_size=100000"], "hydra": ["hydra.mode=MULTIRUN"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))


REFUSED = {  # what the sweep folder is, and the one line that refuses it
    "no multirun.yaml": (lambda sweep: (sweep / "0" / ".hydra").mkdir(parents=True) or (sweep / "0" / ".hydra" / "hydra.yaml").touch(),
                         "has job folders but no multirun.yaml"),
    "cwd gone": (lambda sweep: _multirun(sweep, sweep.parent / "gone"), "which no longer exists"),
    "a search": (lambda sweep: _multirun(sweep, sweep.parent, "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
                 "is a search (OptunaSweeper): re-launched it would sample new trials"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_sweep_that_cannot_be_resumed_is_refused_in_one_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    make, expected = REFUSED[case]
    make(sweep)
    files = sorted(sweep.rglob("*"))
    assert distill_in_process(monkeypatch, "resume", str(sweep)) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"distill resume: error: {sweep}") and expected in line
    assert sorted(sweep.rglob("*")) == files  # no job ran


def test_extra_arguments_to_a_sweep_resume_are_refused(tmp_path, monkeypatch, capsys):
    _multirun(tmp_path / "sweep", tmp_path)
    assert distill_in_process(monkeypatch, "resume", str(tmp_path / "sweep"), "epochs=3") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distill resume: error: extra arguments 'epochs=3'")
