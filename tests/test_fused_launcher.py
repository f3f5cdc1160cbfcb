"""`hydra/launcher=fused`: a sweep's kd jobs that share data and teacher train in one process, each job's
folder as the basic launcher makes it (hydra_plugins/distill_fused_launcher, distill_cli/sweeps/fused_launcher.py)."""

import json
import os
import signal

import pytest
import yaml
from conftest import (
    FAST_KD,
    comparable_results,
    distill_in_process,
    metrics_without_timing,
    on_training_step,
)

import distill_cli.kd.wiring as wiring
import distill_cli.sweeps.fused_launcher as fused
from distill_cli.core.errors import DistillError

pytestmark = pytest.mark.usefixtures("quiet_results")

GRID = ["T=2,4", "alpha=0.5,0.9"]  # 4 jobs, one group
# the fused launcher with its students one after another: each job's numbers exactly as alone
FUSED = ["hydra/launcher=fused", "hydra.launcher.batching=sequential"]


def _recipe(root) -> list[str]:
    """Tiny augmented digits kd jobs (the teacher runs every step) sharing one teacher cache under `root`."""
    return [*FAST_KD, "dataset.augment=true", "baseline=false", "device.type=cpu", "device.threads=1", f"teacher_cache={root / 'cache'}"]


def _sweep(monkeypatch, root, name: str, *args: str) -> tuple[int, object]:
    """`distill kd -m <args>` into the sweep folder `root/name`: its exit status and folder."""
    monkeypatch.chdir(root)
    sweep = root / name
    return distill_in_process(monkeypatch, "kd", "-m", *args, *_recipe(root), f"hydra.sweep.dir={sweep}"), sweep


def _summary(job) -> dict:
    return json.loads((job / "summary.json").read_text())


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same T x alpha sweep with the basic and the fused launcher (the teacher trained by the first),
    and how often the fused sweep ran its teacher and its students."""
    root = tmp_path_factory.mktemp("sweeps")
    teacher_runs, student_runs = [], []
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _sweep(monkeypatch, root, "basic", *GRID)[0] == 0
        build_objective = wiring.build_objective

        def counting_build_objective(*args):
            objective, student_forward, teacher_forward = build_objective(*args)
            return (objective, lambda images: student_runs.append(1) or student_forward(images),
                    lambda images: teacher_runs.append(1) or teacher_forward(images))

        monkeypatch.setattr(wiring, "build_objective", counting_build_objective)
        status, sweep = _sweep(monkeypatch, root, "fused", *FUSED, *GRID)
        assert status == 0
    return root / "basic", sweep, teacher_runs, student_runs


def test_a_fused_sweep_gives_every_job_what_the_basic_launcher_gives_it(sweeps):
    basic, fused_sweep, teacher_runs, student_runs = sweeps
    for n in range(4):
        job, alone = fused_sweep / str(n), basic / str(n)
        assert metrics_without_timing(job) == metrics_without_timing(alone)
        summaries = [_summary(job), _summary(alone)]
        assert summaries[0]["status"] == "completed"
        assert comparable_results(summaries[0])["student"] == comparable_results(summaries[1])["student"]
        assert (job / "best.pt").is_file() and (job / "last.pt").is_file()
    assert teacher_runs and len(student_runs) == 4 * len(teacher_runs)  # one teacher forward per batch of the group


def test_each_fused_job_has_its_hydra_record_and_its_own_log(sweeps):
    fused_sweep = sweeps[1]
    jobs = [fused_sweep / str(n) for n in range(4)]
    for n, job in enumerate(jobs):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert overrides[:2] == [f"T={(2, 2, 4, 4)[n]}", f"alpha={(0.5, 0.9, 0.5, 0.9)[n]}"]
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert (config["T"], config["alpha"]) == ((2, 2, 4, 4)[n], (0.5, 0.9, 0.5, 0.9)[n])
        log = (job / "kd.log").read_text()
        assert f"-> {job}\n" in log and "student epoch 2/2" in log
        others = [other for other in jobs if other != job]
        assert not any(f"-> {other}\n" in log for other in others)
        assert log.count("student epoch 2/2") == 1  # its own epoch lines, not the other students'


def test_a_fused_sweep_writes_its_report_and_distill_report_reads_it(sweeps, monkeypatch):
    fused_sweep = sweeps[1]
    assert "| 4.0 | 0.9 |" in (fused_sweep / "report.md").read_text()  # the sweep report callback
    (fused_sweep / "report.md").unlink()
    assert distill_in_process(monkeypatch, "report", str(fused_sweep), "--no-plots") == 0
    report = json.loads((fused_sweep / "report.json").read_text())
    assert len(report["rows"]) == 4 and "| 2.0 | 0.5 |" in (fused_sweep / "report.md").read_text()


def test_seeds_make_separate_groups_and_a_diverged_job_fails_alone(tmp_path, monkeypatch, capsys):
    groups = []
    run_kd_fused = fused.run_kd_fused
    monkeypatch.setattr(fused, "run_kd_fused", lambda cfgs, *rest: groups.append(len(cfgs)) or run_kd_fused(cfgs, *rest))
    # the first group's second student's first step, after the memory plan's probe step of each of its 2 students
    on_training_step(monkeypatch, 2 + 2, lambda parts: {**parts, "loss": parts["loss"] * float("nan")}, factory="kd_step")
    status, sweep = _sweep(monkeypatch, tmp_path, "seeds", *FUSED, "seed=0,1", "T=2,4")
    assert groups == [2, 2]
    assert status == 1  # job 1 (seed 0, T=4: the group's second student) diverged at its first step
    assert [_summary(sweep / str(n))["status"] for n in range(4)] == ["completed", "failed", "completed", "completed"]
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("distill kd: error: student epoch 1: training diverged")


def test_an_interrupted_fused_job_resumes_alone_to_the_same_metrics(sweeps, tmp_path, monkeypatch):
    basic = sweeps[0]
    monkeypatch.chdir(basic.parent)  # the teacher cache of the sweeps

    def interrupt(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    # epoch 2, step 6, student 2 (digits: 20 steps of 64), after the memory plan's probe step of each of the 4 students
    on_training_step(monkeypatch, 4 + 4 * 25 + 2, interrupt, factory="kd_step")
    status, sweep = _sweep(monkeypatch, basic.parent, "interrupted", *FUSED, *GRID)
    assert status == 128 + signal.SIGTERM
    for n in range(4):
        summary = _summary(sweep / str(n))
        assert summary["status"] == "interrupted" and summary["resume"].endswith(str(sweep / str(n)))
    monkeypatch.undo()
    monkeypatch.setattr(fused, "run_kd_fused", None)  # the resumed job runs through the normal path
    job = sweep / "1"
    assert distill_in_process(monkeypatch, "resume", str(job)) == 0
    assert _summary(job)["status"] == "completed"
    assert "student: resuming after epoch 1 and 6 steps of epoch 2" in (job / "kd.log").read_text()  # not trained again from scratch
    assert metrics_without_timing(job) == metrics_without_timing(basic / "1")


def test_a_bad_batching_setting_is_refused_before_any_job_starts(tmp_path, monkeypatch, capsys):
    status, sweep = _sweep(monkeypatch, tmp_path, "batching", "hydra/launcher=fused", "hydra.launcher.batching=vmap", "T=2,4")
    assert status == 1
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "hydra.launcher.batching" in error and "'vmap'" in error
    assert not (sweep / "0").exists()


def test_several_processes_are_refused_before_any_job_starts(tmp_path, monkeypatch, capsys):
    status, sweep = _sweep(monkeypatch, tmp_path, "processes", "hydra/launcher=fused", "device.processes=2", "T=2,4")
    assert status == 1
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "hydra/launcher=fused" in error and "device.processes=2" in error
    assert not (sweep / "0").exists()


def test_distill_train_sweeps_run_as_the_basic_launcher_runs_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fused, "run_kd_fused", None)  # nothing to share: each job runs alone
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "train"
    args = ["train", "-m", "hydra/launcher=fused", "seed=0,1", "epochs=1", "teacher.kwargs.width=4", "device.type=cpu",
            "device.threads=1", f"teacher_cache={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    assert distill_in_process(monkeypatch, *args) == 0
    assert [_summary(sweep / str(n))["status"] for n in range(2)] == ["completed", "completed"]
    assert "[job" not in capsys.readouterr().out  # jobs run one after another in this process: no shared-terminal prefix


def test_an_error_in_what_the_group_shares_fails_each_of_its_jobs_in_one_line(tmp_path, monkeypatch, capsys):
    status, sweep = _sweep(monkeypatch, tmp_path, "missing", "hydra/launcher=fused", "T=2,4",
                           "dataset=imagefolder", f"dataset.root={tmp_path / 'missing'}")
    assert status == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(str(tmp_path / "missing") in error and "Traceback" not in error for error in errors)
    assert [_summary(sweep / str(n))["status"] for n in range(2)] == ["failed", "failed"]


@pytest.mark.parametrize("budget", ["0", "lots"])  # every bad value: tests/test_fused_memory.py
def test_a_bad_memory_budget_is_refused_in_one_line_before_any_job_starts(budget, tmp_path, monkeypatch, capsys):
    status, sweep = _sweep(monkeypatch, tmp_path, "budget", "hydra/launcher=fused", f"hydra.launcher.memory_gb={budget}", "T=2,4")
    assert status == 1
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("distill kd: error: hydra.launcher.memory_gb: ") and "is not a positive number of GiB" in error
    assert not (sweep / "0").exists()


def test_the_launcher_settings_reach_the_group(tmp_path, monkeypatch):
    settings = []

    def recording(cfgs, run_dirs, batching, memory_gb):
        settings.append((batching, memory_gb))
        raise DistillError("not trained here")

    monkeypatch.setattr(fused, "run_kd_fused", recording)
    status, _ = _sweep(monkeypatch, tmp_path, "budget", "hydra/launcher=fused", "hydra.launcher.memory_gb=2", "T=2,4")
    assert status == 1 and settings == [("auto", 2.0)]  # the defaults: auto, null
    settings.clear()
    status, _ = _sweep(monkeypatch, tmp_path, "stacked", "hydra/launcher=fused", "hydra.launcher.batching=stacked", "T=2,4")
    assert status == 1 and settings == [("stacked", None)]
