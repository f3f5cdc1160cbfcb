import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_cli.config import KDConfig, ModelConfig, TeacherConfig, TrainConfig

DISTILL = Path(sys.executable).with_name("distill")  # the installed console script


def run_distill(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `distill` console script in `cwd` (non-interactive, as under CI)."""
    env = {**os.environ, "CI": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [str(DISTILL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"distill {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def small_train_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A quick teacher recipe on digits (a few epochs of a narrow CNN)."""
    values = dict(
        teacher=TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}),
        epochs=2,
        teacher_cache=str(tmp_path / "cache"),
    )
    return TrainConfig(**{**values, **overrides})


def small_kd_config(tmp_path: Path, **overrides) -> KDConfig:
    values = dict(
        teacher=TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}),
        student=ModelConfig(arch="mlp", kwargs={"hidden": [4]}),
        epochs=2,
        teacher_epochs=2,
        teacher_cache=str(tmp_path / "cache"),
    )
    return KDConfig(**{**values, **overrides})


@pytest.fixture
def quiet_results(monkeypatch):
    """Skip printing the rich results table in in-process task tests."""
    import distill_cli.tasks

    monkeypatch.setattr(distill_cli.tasks, "print_results", lambda summary, per_class=False: None)
