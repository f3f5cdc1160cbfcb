"""Faults, for real: kills, interrupts, damaged checkpoints, diverging losses and bad input.

The in-process tests call the task functions; the `slow` ones run the real console script in a
temporary directory, signal it once its first epoch has landed, resume it with `distill resume` (in
this process: `run_distill_in_process`) and compare with an uninterrupted run of the same recipe (metrics
without timings, test accuracies).
"""

import ast
import errno
import io
import itertools
import json
import logging
import os
import random
import re
import resource
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    comparable_results,
    compose_config,
    dropout_train_config,
    metrics_without_timing,
    on_training_step,
    read_jsonl,
    run_distill_in_process,
    start_distill,
    train_stopped_mid_epoch,
    write_image_tree,
)
from hydra.core.override_parser.overrides_parser import OverridesParser

from distill_cli.core.checkpoint import (
    BEST,
    DAMAGED,
    LAST,
    PREVIOUS,
    load_checkpoint,
    load_resume_checkpoint,
    model_checkpoint,
    save_atomic,
    save_last,
)
from distill_cli.core.config import validate_config
from distill_cli.core.errors import DistillError, Interrupted
from distill_cli.core.run_folders import resumption, run_status
from distill_cli.data import Augment, DatasetInfo, Split
from distill_cli.data.loader import DeviceLoader, StreamLoader
from distill_cli.runs.commands import RUNNERS
from distill_cli.runs.train import run_train
from distill_cli.training.loop import check_finite
from distill_cli.training.rng import rng_state, set_rng_state

PACKAGE = Path(__file__).resolve().parents[1] / "distill_cli"


def _roundtrip(obj):
    """`obj` after torch.save and torch.load(weights_only=True), as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- the data order and the random number generators -------------------------------------------

INFO = DatasetInfo("toy", 3, 1, (2, 2), mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))


LOADERS = {
    "device": lambda split: DeviceLoader(split, INFO, 4, torch.device("cpu"), shuffle=True, seed=3),
    "device+augment": lambda split: DeviceLoader(
        split, INFO, 4, torch.device("cpu"), shuffle=True, seed=3, augment=Augment(pad=1, flip=True)
    ),
    "stream+augment": lambda split: StreamLoader(
        split, INFO, 4, torch.device("cpu"), shuffle=True, seed=3, augment=Augment(pad=1, flip=True), workers=0
    ),
}


def _loader(kind: str = "device"):
    n = 23
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) * torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8)
    return LOADERS[kind](Split(images, torch.arange(n) % 3))


def _draw(loader, batches: int | None = None) -> list:
    """Batches as (images, a number drawn from the loader's generator after each, as augmentation does)."""
    return [
        (batch.images.flatten(1).tolist(), batch.index.tolist(), torch.rand(1, generator=loader.generator).item())
        for batch in itertools.islice(loader, batches)
    ]


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("stop_after", [2, 5])  # mid-epoch, and at the end of the epoch (5 batches of 4)
def test_loader_state_continues_the_data_order_exactly(stop_after, kind):
    reference = _loader(kind)
    expected = _draw(reference) + _draw(reference)  # two epochs, uninterrupted

    first = _loader(kind)
    done = _draw(first, stop_after)
    state = _roundtrip(first.state_dict())
    second = _loader(kind)
    second.load_state_dict(state)
    rest_of_epoch = _draw(second) if stop_after < len(first) else []
    assert done + rest_of_epoch + _draw(second) == expected
    assert (state["order"] is None) == (stop_after == len(first))


def test_rng_state_restores_every_generator():
    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()

    state = _roundtrip(rng_state())
    first = draws()
    set_rng_state(state)
    assert draws() == first


# --- checkpoint files: rotation, verification, fallback ------------------------------------------


def _checkpoint(epoch: int, config: dict | None = None) -> dict:
    model = torch.nn.Linear(30, 30)
    return model_checkpoint(model, "linear", {}, 30, epoch=epoch, config=config or {"seed": 0}, training={"step": epoch})


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_last_checkpoint_rotates_and_damage_is_detected(tmp_path):
    save_last(_checkpoint(1), tmp_path)
    save_last(_checkpoint(2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREVIOUS, LAST]
    assert load_checkpoint(tmp_path / PREVIOUS)["epoch"] == 1 and load_checkpoint(tmp_path / LAST)["epoch"] == 2
    _flip_byte(tmp_path / LAST)  # torch.load alone would load this silently
    with pytest.raises(DistillError, match=r"cannot load checkpoint .*last.pt: damaged file \(CRC mismatch"):
        load_checkpoint(tmp_path / LAST)


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    assert load_resume_checkpoint(tmp_path, {"seed": 0}) is None  # nothing saved yet: start from scratch
    save_last(_checkpoint(1), tmp_path)
    save_last(_checkpoint(2), tmp_path)
    assert load_resume_checkpoint(tmp_path, {"seed": 0, "resume": True})["epoch"] == 2
    (tmp_path / LAST).write_bytes((tmp_path / LAST).read_bytes()[:500])  # truncated
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert load_resume_checkpoint(tmp_path, {"seed": 0})["epoch"] == 1
    assert "resuming from" in caplog.text and PREVIOUS in caplog.text
    save_last(_checkpoint(2), tmp_path)  # the damaged last.pt was set aside: it does not become last.prev.pt
    assert load_checkpoint(tmp_path / PREVIOUS)["epoch"] == 1 and (tmp_path / DAMAGED).is_file()
    (tmp_path / LAST).write_bytes(b"")
    _flip_byte(tmp_path / PREVIOUS)
    with pytest.raises(DistillError, match=r"^cannot resume .*last.pt: .*last.prev.pt: damaged file \(CRC mismatch"):
        load_resume_checkpoint(tmp_path, {"seed": 0})


class _FullDisk:
    """A file on a disk that has room for `room` more bytes: past them every write fails with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _fill_disk(monkeypatch, where: str) -> None:
    """Fill the disk: from now on writes fail at their first byte, partway through torch's zip writer, or at fsync."""
    if where == "fsync":  # e.g. NFS or delayed allocation: the data is accepted, then fsync finds no room
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
        return
    room = {"first write": 0, "zip writer": 2000}[where]
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: _FullDisk(real_fdopen(fd, *args, **kwargs), room))


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.mark.parametrize("where", ["first write", "zip writer", "fsync"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch, where):
    save_last(_checkpoint(1), tmp_path)
    save_last(_checkpoint(2), tmp_path)
    save_atomic(_checkpoint(2), tmp_path / BEST)
    before = _files(tmp_path)

    _fill_disk(monkeypatch, where)
    with pytest.raises(DistillError) as last:
        save_last(_checkpoint(3), tmp_path)
    with pytest.raises(DistillError) as best:
        save_atomic(_checkpoint(3), tmp_path / BEST)
    with pytest.raises(DistillError) as first:
        save_last(_checkpoint(1), tmp_path / "new")  # nothing to keep
    monkeypatch.undo()

    assert str(last.value) == f"no space left on {tmp_path} while writing last.pt (last good checkpoint kept)"
    assert str(best.value) == f"no space left on {tmp_path} while writing best.pt (the previous best.pt kept)"
    assert str(first.value) == f"no space left on {tmp_path / 'new'} while writing last.pt"
    if where == "zip writer":  # torch reports the failed write as its own error, raised while handling it
        assert re.match(r"\[enforce fail at .*\] \. unexpected pos", str(last.value.__cause__))
    assert _files(tmp_path) == before  # untouched, and no temp file left behind
    assert not list((tmp_path / "new").iterdir())
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 2 and load_checkpoint(tmp_path / BEST)["epoch"] == 2


def test_resume_ignores_the_trackers_and_resume_itself(tmp_path):
    """Where metrics also go (logger) does not change the training: a run from before the trackers resumes."""
    save_last(_checkpoint(1, {"seed": 0, "resume": False}), tmp_path)
    logger = {"tensorboard": True, "mlflow": False, "tracking_uri": "sqlite:///outputs/mlflow.db", "experiment": "", "name": ""}
    assert load_resume_checkpoint(tmp_path, {"seed": 0, "resume": True, "logger": logger})["epoch"] == 1


def test_a_run_from_before_a_config_key_existed_resumes_with_a_warning(tmp_path, caplog):
    """A key distill gained since last.pt was written (there at its default) does not stop the resume; it is named."""
    save_last(_checkpoint(1, {"seed": 0, "optimizer": {"lr": 0.1}}), tmp_path)
    config = {"seed": 0, "teacher_views": 0, "optimizer": {"lr": 0.1, "decay_all": False}}
    assert load_resume_checkpoint(tmp_path, config)["epoch"] == 1
    assert "resuming with optimizer.decay_all=False, teacher_views=0" in caplog.text
    with pytest.raises(DistillError, match=r"\(optimizer.lr: 0.1 then, 0.2 now\)"):
        load_resume_checkpoint(tmp_path, {**config, "optimizer": {"lr": 0.2, "decay_all": False}})


def test_resume_refuses_a_changed_config_a_newer_format_and_code(tmp_path):
    save_last(_checkpoint(1, {"seed": 0, "optimizer": {"lr": 0.1}}), tmp_path)
    with pytest.raises(DistillError, match=r"config changed .*\(optimizer.lr: 0.1 then, 0.2 now\)"):
        load_resume_checkpoint(tmp_path, {"seed": 0, "optimizer": {"lr": 0.2}})
    save_atomic({**_checkpoint(2), "format_version": 99}, tmp_path / LAST)
    with pytest.raises(DistillError, match="format 99; this distill reads formats 1 to"):
        load_checkpoint(tmp_path / LAST)

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({**_checkpoint(3), "payload": RunsCode()}, tmp_path / PREVIOUS)
    (tmp_path / LAST).unlink()
    with pytest.raises(DistillError, match="cannot resume .*last.prev.pt is not a checkpoint distill can load safely"):
        load_resume_checkpoint(tmp_path, {"seed": 0})
    assert not (tmp_path / "pwned").exists()


def test_every_torch_load_is_weights_only():
    """No load path can run a pickle's code: every torch.load in the package passes weights_only=True."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "pickle.load", "pickle.loads"):
                calls.append(f"{path.name}: {ast.unparse(node)}")
    assert calls and all("torch.load(" in call and "weights_only=True" in call for call in calls), calls


def _run_folder(run: Path, command: str, overrides: list[str], hydra_overrides: list[str] = ()) -> None:
    """The `.hydra/` record Hydra leaves in a run folder, as much of it as `distill resume` reads."""
    hydra = {"job": {"config_name": command}, "overrides": {"hydra": list(hydra_overrides)}, "runtime": {"cwd": str(run.parent)}}
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(json.dumps({"hydra": hydra}))  # JSON is YAML
    (run / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))


def test_resumption_replays_the_overrides_into_the_same_folder(tmp_path):
    run = tmp_path / "it's a [run], x"
    _run_folder(run, "kd", ["T=2", "student.kwargs.hidden=[8]", "resume=true"], ["hydra.mode=MULTIRUN", "hydra.verbose=true"])
    plan = resumption(run)
    assert (plan.command, plan.cwd) == ("kd", tmp_path)
    assert plan.arguments[:3] == ["T=2", "student.kwargs.hidden=[8]", "hydra.verbose=true"]  # no resume=, no hydra.mode
    overrides = OverridesParser.create().parse_overrides(plan.arguments[3:])
    assert {o.key_or_group: o.value() for o in overrides} == {
        "resume": True, "hydra.run.dir": str(run.resolve()), "hydra.output_subdir": None
    }


# --- in-process: an interrupt mid-epoch, a diverging loss ----------------------------------------


@pytest.mark.usefixtures("quiet_results")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, signum):
    cfg = dropout_train_config(tmp_path)
    reference = run_train(cfg, tmp_path / "reference")
    stopped = train_stopped_mid_epoch(monkeypatch, cfg, tmp_path / "run", signum)
    assert stopped.signum == signum
    assert stopped.where == "teacher epoch 2 step 5/20, saved to last.pt"
    last = load_checkpoint(tmp_path / "run" / LAST)
    assert last["epoch"] == 1 and last["training"]["partial"]["steps"] == 5
    assert [row["epoch"] for row in metrics_without_timing(tmp_path / "run")] == [1]

    resumed = run_train(replace(cfg, resume=True), tmp_path / "run")
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "reference")
    assert comparable_results(resumed) == comparable_results(reference)


@pytest.mark.usefixtures("quiet_results")
@pytest.mark.parametrize("second_during", ["step", "save"])
def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, second_during):
    """Ctrl-C twice: the first asks for a checkpoint at the next step boundary, the second (in the same
    step, or while that checkpoint is being written) stops at once; last.pt stays the epoch-1 one."""
    run = tmp_path / "run"
    reached, epoch_one = [], {}
    real_save = torch.save

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    def interrupt(parts):  # epoch 2, step 5
        epoch_one["last.pt"] = (run / LAST).read_bytes()
        ctrl_c()
        reached.append("went on after the first")
        if second_during == "step":
            ctrl_c()
            reached.append("went on after the second")
        return parts

    def save_then_ctrl_c(obj, file):  # the second arrives once the mid-epoch checkpoint's bytes are written
        real_save(obj, file)
        if obj.get("training", {}).get("partial") is not None:
            reached.append("saving")
            ctrl_c()

    on_training_step(monkeypatch, 25, interrupt)
    if second_during == "save":
        monkeypatch.setattr(torch, "save", save_then_ctrl_c)
    with pytest.raises(Interrupted) as stopped:
        run_train(dropout_train_config(tmp_path), run)
    monkeypatch.undo()
    assert (stopped.value.signum, stopped.value.where) == (signal.SIGINT, "a second signal: stopped without saving")
    assert reached == ["went on after the first"] + (["saving"] if second_during == "save" else [])
    assert (run / LAST).read_bytes() == epoch_one["last.pt"]  # not replaced, nor half-written
    last = load_checkpoint(run / LAST)
    assert last["epoch"] == 1 and last["training"]["partial"] is None
    assert sorted(path.name for path in run.glob("*.pt")) == [BEST, LAST] and not list(run.glob(".*.tmp"))


@pytest.mark.usefixtures("quiet_results")
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    on_training_step(monkeypatch, 23, lambda parts: {name: value * float("nan") for name, value in parts.items()})
    with pytest.raises(DistillError) as error:
        run_train(dropout_train_config(tmp_path), tmp_path / "run")
    # NaN weights after step 3 of epoch 2 make every later loss NaN too: 18 of the 20 steps
    assert str(error.value).startswith("teacher epoch 2: training diverged, loss NaN/Inf at step 3 (18 of 20 steps)")
    assert "last.pt holds epoch 1" in str(error.value)
    for name in (LAST, BEST):
        checkpoint = load_checkpoint(tmp_path / "run" / name)
        assert checkpoint["epoch"] == 1
        assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())
    assert [row["epoch"] for row in metrics_without_timing(tmp_path / "run")] == [1]


def test_loss_scaling_tolerates_skipped_steps_but_not_a_whole_bad_epoch():
    read = {"bad_steps": 3, "first_bad": 4, "weights_finite": True}
    check_finite(read, 20, tolerate_bad_steps=True, where="e", saved="s")  # fp16: GradScaler skipped them
    with pytest.raises(DistillError, match=r"^e: training diverged, loss NaN/Inf at step 5 \(3 of 20 steps\)"):
        check_finite(read, 20, tolerate_bad_steps=False, where="e", saved="s")
    with pytest.raises(DistillError, match="20 of 20 steps"):
        check_finite({**read, "bad_steps": 20}, 20, tolerate_bad_steps=True, where="e", saved="s")
    with pytest.raises(DistillError, match="weights NaN/Inf"):
        check_finite({**read, "bad_steps": 0, "weights_finite": False}, 20, tolerate_bad_steps=True, where="e", saved="s")


# --- the real console script: kill, interrupt, resume ---------------------------------------------

# small, but with dropout in teacher and student so the RNG state matters, and enough epochs that a
# run signalled after its first epoch cannot have finished
TRAIN = ["teacher=mlp", "teacher.kwargs.hidden=[32]", "epochs=12", "device=cpu"]
KD = ["teacher=mlp", "teacher.kwargs.hidden=[32]", "teacher_epochs=10", "student=mlp", "student.kwargs.hidden=[8]", "epochs=12", "device=cpu"]


def _reference(tmp_path_factory, command: str, overrides: list[str]) -> Path:
    """An uninterrupted run of the config `distill <command> <overrides>` composes, run in-process."""
    run_dir = tmp_path_factory.mktemp(f"{command}_reference")
    cfg = validate_config(command, compose_config(command, overrides))
    RUNNERS[command](replace(cfg, teacher_cache=str(run_dir / "cache")), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory) -> Path:
    return _reference(tmp_path_factory, "train", TRAIN)


@pytest.fixture(scope="module")
def kd_reference(tmp_path_factory) -> Path:
    return _reference(tmp_path_factory, "kd", KD)


def _wait_for(process: subprocess.Popen, cwd: Path, pattern: str) -> None:
    """Poll until a file matching `pattern` (a glob under `cwd`) has content, while `process` runs."""
    while not any(path.stat().st_size for path in cwd.glob(pattern)):
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)


def _signal_when(process: subprocess.Popen, cwd: Path, pattern: str, signum: int) -> None:
    """Once a file matching `pattern` has content, send `process` the signal."""
    _wait_for(process, cwd, pattern)
    process.send_signal(signum)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _one_line(result: subprocess.CompletedProcess, code: int | None = None) -> str:
    """The one line a failed or interrupted command printed on stderr (no traceback anywhere)."""
    assert result.returncode != 0 if code is None else result.returncode == code, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _assert_same_run(run: Path, reference: Path) -> dict:
    assert metrics_without_timing(run) == metrics_without_timing(reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert comparable_results(summary) == comparable_results(json.loads((reference / "summary.json").read_text()))
    return summary


def _saved_history(run: Path) -> list[dict]:
    """The metrics rows held by the checkpoint a resume of `run` starts from (last.pt; last.prev.pt if
    the run stopped between the two renames of a save)."""
    return load_checkpoint(run / LAST if (run / LAST).exists() else run / PREVIOUS)["training"]["history"]


def _assert_continued(run: Path, saved: list[dict], reference: Path) -> dict:
    """`run` went on from its checkpoint, not from scratch (its first rows, timings and all, are the `saved`
    ones), and ended as the uninterrupted `reference` did."""
    assert saved and read_jsonl(run / "metrics.jsonl")[: len(saved)] == saved
    return _assert_same_run(run, reference)


@pytest.mark.slow
def test_train_killed_with_a_damaged_last_checkpoint_resumes_exactly(tmp_path, train_reference):
    run = tmp_path / "run"
    process = start_distill("train", *TRAIN, "hydra.run.dir=run", cwd=tmp_path)
    _signal_when(process, tmp_path, "run/last.prev.pt", signal.SIGKILL)  # two epochs saved
    process.communicate()
    assert run_status(run) is None  # it died before it could finish
    (run / LAST).write_bytes(b"PK\x03\x04 damaged")
    resumed = run_distill_in_process("resume", str(run), cwd=tmp_path)
    assert f"resuming from {run.resolve() / PREVIOUS} instead" in resumed.stdout
    _assert_same_run(run, train_reference)
    assert (run / DAMAGED).read_bytes() == b"PK\x03\x04 damaged"  # kept aside, not rotated into last.prev.pt

    before = (run / LAST).stat().st_mtime_ns
    done = run_distill_in_process("resume", str(run), cwd=tmp_path)  # a finished run: nothing to do
    assert "already completed" in done.stdout and (run / LAST).stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize("part", ["teacher", "baseline"])
def test_kd_killed_while_training_its_teacher_or_baseline_resumes_it(tmp_path, kd_reference, part):
    """kd trains its teacher, then the student-alone baseline, into <run>/teacher/ and <run>/baseline/. The
    cache's file lock died with the process; the resumed run continues that training, then the rest."""
    run = tmp_path / "run"
    process = start_distill("kd", *KD, "hydra.run.dir=run", cwd=tmp_path)
    _signal_when(process, tmp_path, f"run/{part}/last.prev.pt", signal.SIGKILL)  # two of its epochs saved
    process.communicate()
    assert run_status(run / part) is None
    saved = _saved_history(run / part)
    run_distill_in_process("resume", str(run), cwd=tmp_path, timeout=120)  # a lock still held would time out here
    _assert_continued(run / part, saved, kd_reference / part)
    summary = _assert_same_run(run, kd_reference)
    assert summary[part]["source"] == "trained"


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_its_job_folder_resumes(tmp_path, kd_reference):
    process = start_distill("kd", "-m", "alpha=0.9,0.5", *KD, cwd=tmp_path)
    _signal_when(process, tmp_path, "outputs/multirun/*/*/0/metrics.jsonl", signal.SIGINT)
    result = _finish(process)
    line = _one_line(result, 128 + signal.SIGINT)
    (job,) = tmp_path.glob("outputs/multirun/*/*/0")
    assert line.startswith("distill kd: interrupted by SIGINT (") and "saved to last.pt" in line
    command = line.split("; resume with: ")[1]
    assert command == f"distill resume {job.resolve()}"
    assert not list(tmp_path.glob("outputs/multirun/*/*/1"))  # the sweep stopped
    assert run_status(job) == "interrupted"
    # the sweep report of what finished, written on Ctrl-C: here no job had finished, and it says so
    assert "sweep interrupted before any job finished: no sweep report in" in result.stdout
    assert not (job.parent / "report.md").exists()
    run_distill_in_process(*command.split(" ", 2)[1:], cwd=tmp_path)
    _assert_same_run(job, kd_reference)  # job 0 is alpha=0.9, the reference's alpha (loss=kd's default)


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = start_distill("train", *TRAIN, "hydra.run.dir=run", cwd=tmp_path)
    _signal_when(process, tmp_path, "run/metrics.jsonl", signal.SIGTERM)
    line = _one_line(_finish(process), 128 + signal.SIGTERM)
    assert line.startswith("distill train: interrupted by SIGTERM (")
    assert line.endswith(f"saved to last.pt); resume with: distill resume {run.resolve()}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume"] == f"distill resume {run.resolve()}"
    assert "training" in load_checkpoint(run / LAST)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="limits the file size of a running process (Linux)")
@pytest.mark.parametrize("room", ["for small files", "for nothing"])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, train_reference, room):
    """The disk fills up under a running `distill train`: from then on no file may grow past the older
    checkpoint's size (the next last.pt fails; logs, metrics and summary still fit), or grow at all. The
    OS's file size limit (RLIMIT_FSIZE), set on the running process, fails those writes with EFBIG as a
    full disk fails them with ENOSPC. The run fails in one line, keeps its checkpoints, and resumes."""
    run = tmp_path.resolve() / "run"
    process = start_distill("train", *TRAIN, "hydra.run.dir=run", cwd=tmp_path)
    _wait_for(process, tmp_path, "run/last.prev.pt")  # two epochs saved
    limit = (run / PREVIOUS).stat().st_size if room == "for small files" else 0
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))
    stopped = _finish(process)
    line = _one_line(stopped, 1)
    full = f"file size limit reached on {run} while writing"
    if room == "for small files":
        assert line == f"distill train: error: {full} last.pt (last good checkpoint kept)"
        assert json.loads((run / "summary.json").read_text())["error"] == line.split("error: ", 1)[1]
        assert run_status(run) == "failed"
    else:  # the first write after the limit fails (mostly metrics.jsonl), then summary.json's
        assert re.fullmatch(
            rf"distill train: error: {re.escape(full)} (metrics\.jsonl|best\.pt \(the previous best\.pt kept\)|"
            r"last\.pt \(last good checkpoint kept\))",
            line,
        )
        assert f"summary.json not written: {full} summary.json" in stopped.stdout
        assert run_status(run) is None
    assert not list(run.glob(".*.tmp"))
    saved = _saved_history(run)
    assert len(saved) < 12
    load_checkpoint(run / BEST)  # intact (it may hold the epoch whose last.pt failed: best.pt is written first)

    run_distill_in_process("resume", str(run), cwd=tmp_path)  # the failed run goes on from its last good checkpoint
    _assert_continued(run, saved, train_reference)


# --- bad input: one line, non-zero exit ------------------------------------------------------------

BAD_INPUT = [  # (arguments, what the one line says); {tmp} is the test's directory
    (["resume", "{tmp}/nowhere"], "distill resume: error: {tmp}/nowhere is not a folder"),
    (["resume", "{tmp}"], "is not a distill run folder"),
    (["resume", "{tmp}/sweep"], "distill resume: error: {tmp}/sweep: cannot read its multirun.yaml (KeyError"),
    (["resume", "{tmp}/damaged"], "distill train: error: cannot resume {tmp}/damaged: cannot load checkpoint {tmp}/damaged/last.pt"),
    (["resume", "{tmp}/damaged", "epochs=3"], "distill resume: error: extra arguments 'epochs=3': a resumed run keeps the config"),
    (["kd", "alpha=0", "hydra.run.dir=/proc/forbidden"], "cannot use /proc/forbidden"),
    (["kd", "alpha=0", "hydra.run.dir={tmp}/cnn.pt/run"], "cannot use {tmp}/cnn.pt/run: Not a directory"),
    (["kd", "alpha=0", "student.arch=mpl"], "unknown model 'mpl': did you mean 'mlp'?"),
    (["kd", "alpha=0", "loss.name=hintn"], "unknown loss 'hintn'"),
    (["kd", "teacher.checkpoint={tmp}/missing.pt"], "checkpoint not found: {tmp}/missing.pt"),
    (["kd", "teacher=mlp", "teacher.checkpoint={tmp}/cnn.pt"], "holds cnn(width=8) but teacher= is mlp("),
    (["kd", "teacher.kwargs.width=8", "teacher.checkpoint={tmp}/hundred.pt"], "predicts 100 classes but dataset digits has 10"),
    (["kd", "alpha=0", "batch_size=5000"], "batch_size=5000 is larger than the training split"),
    (["train", "device=cpu", "device.precision=fp16"], "device.precision: fp16 needs CUDA"),
    (["kd", "teacher=ensemble"], "distill kd: error: teacher.members: an empty ensemble"),
    (["kd", "generations=0"], "distill kd: error: generations: must be >= 1"),
    (["kd", "peers=[mlp_small]"], "distill kd: error: peers: deep mutual learning needs two or more networks"),
    (["train", "teacher=mlp_small", "epochs=2", "optimizer.lr=1e30", "hydra.run.dir={tmp}/nan"],
     "teacher epoch 1: training diverged, loss NaN/Inf at step"),
    # refused before the teacher trains: a batch-relational method with a batch of one, a method's memory
    (["kd", "loss=rkd", "batch_size=1"],
     "distill kd: error: batch_size=1: loss=rkd compares the samples of a batch with each other and needs batch_size >= 2"),
    (["kd", "loss=crd", "loss.negatives=1000000000"],
     "distill kd: error: loss=crd would hold ~3.7 TiB (2 memory banks of 1294 x loss.embed_dim=128 floats"),
    (["kd", "alpha=0", "dataset=imagefolder", "dataset.root={tmp}/tree", "dataset.cache_dir={tmp}/cache", "batch_size=4"],
     "distill kd: error: dataset.root: the class folder {tmp}/tree/train/b has no images (.bmp"),
    (["kd", "teacher.checkpoint={tmp}/notes.txt"], "distill kd: error: {tmp}/notes.txt is not a checkpoint distill can load: it is text, beginning 'teacher"),
    (["quantize", "{tmp}/notes.txt"], "distill quantize: error: {tmp}/notes.txt is not a checkpoint distill can load: it is text"),
    # a preset's published numbers: a method key that names no method, a number that is no accuracy in %
    (["kd", "alpha=0", "+published.kd.dkdd=70"], "distill kd: error: published.kd.dkdd: 'dkdd' is no method (loss=)"),
    (["train", "published.teacher=0.79"], "distill train: error: published.teacher: must be a top-1 accuracy in % (79.42, not 0.7942), got 0.79"),
]


# through the real console script, side by side: an error before Hydra starts (resume), one of Hydra's
# own (its run folder) and one inside the job (the config); the other cases run in-process
BY_THE_CONSOLE_SCRIPT = (0, 5, 13)


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    tmp = tmp_path.resolve()
    (tmp / "sweep").mkdir()
    (tmp / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    _run_folder(tmp / "damaged", "train", ["teacher=mlp_small"])
    for name in (LAST, PREVIOUS):
        (tmp / "damaged" / name).write_bytes(b"PK\x03\x04 damaged")
    for name, classes in (("cnn.pt", 10), ("hundred.pt", 100)):  # teachers of the wrong kinds
        save_atomic(model_checkpoint(torch.nn.Linear(2, 2), "cnn", {"width": 8}, classes), tmp / name)
    (tmp / "notes.txt").write_text("teacher: trained on the lab machine\n")
    write_image_tree(tmp / "tree", "train", 12, classes=("a",))
    (tmp / "tree" / "train" / "b").mkdir()  # a class folder without images
    cases = [([arg.format(tmp=tmp) for arg in args], expected.format(tmp=tmp)) for args, expected in BAD_INPUT]
    processes = {case: start_distill(*cases[case][0], cwd=tmp) for case in BY_THE_CONSOLE_SCRIPT}
    for case, (args, expected) in enumerate(cases):
        result = _finish(processes[case]) if case in processes else run_distill_in_process(*args, cwd=tmp, check=False)
        assert expected in _one_line(result), args
    summary = json.loads((tmp / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert not (tmp / "nan" / LAST).exists()  # nothing of the diverged epoch was saved
