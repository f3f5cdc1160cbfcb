"""End to end, in a fresh directory (as a user would run it): the real console script where the process
itself is what is checked (the README's commands, parallel processes, `python -m`), else `run_distill_in_process`."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    DISTILL,
    FAST_KD,
    assert_trained_once,
    read_jsonl,
    run_distill,
    run_distill_in_process,
)

from distill_cli.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow



def _run_folder(root: Path, command: str) -> Path:
    (folder,) = [p for p in (root / "outputs").glob(f"*/*_{command}") if p.is_dir()]
    return folder


def _summaries(root: Path) -> list[dict]:
    """Summaries of the sweep's jobs (outputs/multirun/<date>/<time>_kd/<job>/summary.json)."""
    return [json.loads(p.read_text()) for p in sorted((root / "outputs" / "multirun").glob("*/*/*/summary.json"))]


def _assert_run_folder(folder: Path, epochs: int) -> dict:
    assert (folder / ".hydra" / "config.yaml").is_file() and (folder / ".hydra" / "overrides.yaml").is_file()
    rows = read_jsonl(folder / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert {"loss", "train_acc", "val_acc", "lr", "images_per_s", "seconds"} <= set(row)
        assert row["images_per_s"] > 0 and 0 <= row["val_acc"] <= 1
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(folder / name)  # weights_only=True
        assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temp files behind
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["wall_time_s"] > 0
    return summary


def test_train_then_kd_with_no_arguments(tmp_path):
    """The README's promise: `distill train` then `distill kd`, offline, on the embedded dataset."""
    train = run_distill("train", cwd=tmp_path)
    train_dir = _run_folder(tmp_path, "train")
    train_summary = _assert_run_folder(train_dir, epochs=30)
    teacher = train_summary["teacher"]
    assert teacher["test_acc_best"] > 0.9 and teacher["test_acc_last"] > 0.9
    assert "test acc (best)" in train.stdout and "teacher" in train.stdout  # the results table

    kd = run_distill("kd", cwd=tmp_path)
    kd_dir = _run_folder(tmp_path, "kd")
    summary = _assert_run_folder(kd_dir, epochs=30)
    assert summary["teacher"]["source"] == "cache"  # the teacher `distill train` just made
    assert summary["teacher"]["test_acc"] == pytest.approx(teacher["test_acc_best"])
    assert (summary["T"], summary["alpha"], summary["loss"]) == (4.0, 0.9, {"name": "kd", "logit_standardization": False})  # configs/loss/kd.yaml
    student = summary["student"]
    assert student["params"] < teacher["params"] and summary["compression"] > 10
    assert {"test_acc_best", "test_acc_last", "best_epoch", "selection"} <= set(student)
    assert student["test_acc_best"] > 0.8
    assert {"loss", "loss/ce", "loss/kd"} <= set(read_jsonl(kd_dir / "metrics.jsonl")[0])
    assert "compression" in kd.stdout and "student" in kd.stdout
    assert Path(summary["teacher"]["checkpoint"]).is_file()
    assert summary["baseline"]["source"] == "trained"  # the same student alone, trained once and cached
    assert summary["kd_gain"] == pytest.approx(student["test_acc_best"] - summary["baseline"]["test_acc_best"])
    assert "KD gain over the same student trained alone" in kd.stdout


def test_multirun_sweep_trains_the_teacher_and_the_baseline_once(tmp_path):
    result = run_distill_in_process("kd", "-m", "T=2,4", "alpha=0.5,0.9", *FAST_KD, cwd=tmp_path)
    summaries = _summaries(tmp_path)
    assert len(summaries) == 4, result.stdout
    assert sorted((s["T"], s["alpha"]) for s in summaries) == [(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)]
    assert_trained_once(summaries, [Path(s["run_dir"]) for s in summaries])


def test_parallel_jobs_wait_for_one_teacher_and_one_baseline(tmp_path):
    """Separate processes started together (as a parallel launcher would) share one teacher and one baseline."""
    env_cmd = [str(DISTILL), "kd", *FAST_KD]
    procs = [
        subprocess.Popen([*env_cmd, f"alpha={alpha}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for alpha in (0.3, 0.6, 0.9)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/*_kd/summary.json")]
    assert len(summaries) == 3
    assert_trained_once(summaries, [Path(s["run_dir"]) for s in summaries])


def test_failed_sweep_job_is_reported_and_others_finish(tmp_path):
    result = run_distill_in_process("kd", "-m", "batch_size=5000,32", "alpha=0", "epochs=1", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert "batch_size=5000 is larger than the training split" in error
    failed, completed = _summaries(tmp_path)  # job 0 (batch_size=5000), job 1 (batch_size=32)
    assert failed["status"] == "failed" and "batch_size=5000" in failed["error"]
    assert completed["status"] == "completed" and completed["student"]["test_acc_best"] > 0


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distill_cli", "kd", "alpha=0", "epochs=1", "--cfg", "job"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0 and "alpha: 0" in result.stdout


def test_wheel_carries_the_configs(tmp_path):
    """A non-editable install finds configs/ inside the package."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("train.yaml", "kd.yaml", "dataset/digits.yaml", "model/cnn.yaml", "hydra/job_logging/distill.yaml", "hydra/launcher/fused.yaml"):
        assert f"distill_cli/configs/{config}" in names
    assert "hydra_plugins/distill_fused_launcher/fused_launcher.py" in names  # Hydra takes launchers from hydra_plugins only
