"""Sweeps through Hydra's plugins: parallel jobs (joblib), SLURM/local subprocesses (submitit) and an Optuna search.

The joblib sweep runs through the real console script (its workers share its terminal); the others
launch from the test's process (`run_distill_in_process`), the submitit jobs still in processes of their own."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST_KD, assert_trained_once, run_distill, run_distill_in_process

pytestmark = pytest.mark.slow


def _job_summaries(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def test_joblib_runs_jobs_in_parallel_processes_trains_once_and_reports_their_failures(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["kd", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "T=2,4,0", *FAST_KD, f"hydra.sweep.dir={sweep}"]
    result = run_distill(*args, cwd=tmp_path, check=False)
    # job 2 (T=0) failed in a worker process; the launching process still reports it and exits non-zero
    assert result.returncode == 1, result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith("distill kd: error") and "T: temperature must be a finite number > 0" in error
    jobs = _job_summaries(sweep)
    assert [jobs[n]["status"] for n in range(3)] == ["completed", "completed", "failed"]
    completed = [jobs[0], jobs[1]]
    assert_trained_once(completed, [Path(s["run_dir"]) for s in completed])
    # one terminal, two worker processes: each console line names its job; each job's log file holds its own lines only
    progress = [line for line in result.stdout.splitlines() if " epoch " in line]
    assert progress and all(line.startswith(("[job 0] ", "[job 1] ")) for line in progress), progress
    for n in (0, 1):
        log = (sweep / str(n) / "kd.log").read_text()
        assert "[job" not in log and f"-> {sweep / str(n)}" in log and f"-> {sweep / str(1 - n)}\n" not in log


def test_optuna_search_picks_the_best_validation_setting(tmp_path):
    sweep = tmp_path / "search"
    args = ["kd", "-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=3", *FAST_KD, f"hydra.sweep.dir={sweep}"]
    run_distill_in_process(*args, cwd=tmp_path)
    jobs = _job_summaries(sweep)
    assert len(jobs) == 3 and all(s["status"] == "completed" for s in jobs.values())
    assert len({(s["T"], s["alpha"]) for s in jobs.values()}) == 3  # the sampler proposed three settings
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the objective is the student's validation accuracy at best.pt's epoch, never a test number
    best_val = max(s["student"]["val_acc_best"] for s in jobs.values())
    assert best["best_value"] == pytest.approx(best_val)
    chosen = [s for s in jobs.values() if s["student"]["val_acc_best"] == pytest.approx(best_val)]
    assert any(best["best_params"] == {"T": s["T"], "alpha": s["alpha"]} for s in chosen), (best, jobs)


def test_optuna_search_trains_each_batch_of_trials_fused(tmp_path):
    """`hydra.sweeper.n_jobs=2` hands the launcher two trials at a time: the fused launcher trains them as one
    group, and the sampler still gets each trial's own validation accuracy."""
    sweep = tmp_path / "search"
    args = ["kd", "-m", "hydra/sweeper=search", "hydra/launcher=fused", "hydra.launcher.batching=sequential",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *FAST_KD, f"hydra.sweep.dir={sweep}"]
    run_distill_in_process(*args, cwd=tmp_path)
    jobs = _job_summaries(sweep)
    assert sorted(jobs) == [0, 1] and all(s["status"] == "completed" for s in jobs.values())
    for n in range(2):
        assert "fused: 2 students train on shared batches" in (sweep / str(n) / "kd.log").read_text()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(s["student"]["val_acc_best"] for s in jobs.values()))


def test_optuna_search_without_a_validation_split_is_refused_before_training(tmp_path):
    sweep = tmp_path / "search"
    result = run_distill_in_process(
        "kd", "-m", "hydra/sweeper=search", "dataset.val_split=0", *FAST_KD, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert "dataset.val_split=0 leaves no validation split" in error
    assert not list(sweep.rglob("metrics.jsonl")) and not (tmp_path / "outputs" / "teacher_cache").exists()


def test_submitit_local_launcher_runs_the_sweep_and_the_slurm_preset_composes(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["kd", "-m", "hydra/launcher=submitit_local", "T=2,4", *FAST_KD, f"hydra.sweep.dir={sweep}"]
    run_distill_in_process(*args, cwd=tmp_path)
    jobs = list(_job_summaries(sweep).values())
    assert sorted(s["T"] for s in jobs) == [2.0, 4.0] and all(s["status"] == "completed" for s in jobs)
    assert_trained_once(jobs, [Path(s["run_dir"]) for s in jobs])
    assert (sweep / ".submitit").is_dir()  # submitit ran them
    printed = run_distill_in_process("kd", "hydra/launcher=slurm", "--cfg", "hydra", cwd=tmp_path).stdout
    launcher = yaml.safe_load(printed)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["gpus_per_node"] == 1
