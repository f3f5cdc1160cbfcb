import contextlib
import io
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from distill_cli.core.checkpoint import load_checkpoint
from distill_cli.core.errors import Interrupted
from distill_cli.core.config import (
    DeviceConfig,
    KDConfig,
    ModelConfig,
    TeacherConfig,
    TrainConfig,
    config_dir,
    register_configs,
)
from distill_cli.runs import student
from distill_cli.ship.evaluate import Timing

DISTILL = Path(sys.executable).with_name("distill")  # the installed console script

# a suite started in the background of a non-interactive shell (`pytest &`) inherits SIGINT ignored, and
# so would the runs it starts; the Ctrl-C tests need it delivered as in a terminal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
CPU_DEVICE = DeviceConfig(type="cpu")


# how a kd run times its student's speed-up over the teacher (tests/test_ship.py checks it); the other tests' runs
# time 2 quick rounds at batch 32, which took a second of each run at 10 rounds of 256 (speed-ups are no test's business)
SPEEDUP_TIMING = student.SPEEDUP_TIMING


@pytest.fixture(autouse=True)
def _quick_speed_up(monkeypatch):
    monkeypatch.setattr(student, "SPEEDUP_TIMING", Timing(warmup=1, batch=32, repeats=2))


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A run in this process with device.threads=N sets torch's thread count for the process: undone after
    each test, so a test's numbers do not depend on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _distill_env() -> dict:
    """The environment of a non-interactive user, as under CI."""
    env = {**os.environ, "CI": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_distill(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `distill` console script in `cwd` (non-interactive, as under CI)."""
    result = subprocess.run(
        [str(DISTILL), *args], cwd=cwd, env=_distill_env(), capture_output=True, text=True, timeout=timeout
    )
    return _checked(result) if check else result


def _checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, or an AssertionError with its output where it exited non-zero."""
    if result.returncode != 0:
        command = " ".join(["distill", *result.args[1:]])
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def start_distill(*args: str, cwd: Path) -> subprocess.Popen:
    """Start the real `distill` console script in `cwd` without waiting for it (to signal it)."""
    return subprocess.Popen(
        [str(DISTILL), *args], cwd=cwd, env=_distill_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def distill_in_process(monkeypatch, *args: str) -> int:
    """`distill <args>` in this process (`cli.main`); the environment it sets for Hydra is undone after the test."""
    from distill_cli.cli import main as cli

    for variable in ("HYDRA_FULL_ERROR", "DISTILL_TRACEBACK"):
        monkeypatch.setenv(variable, "0")
    return cli.main(list(args))


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the code inside (where it waits) once it has run for `seconds`."""

    def time_out(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, time_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _root_logger_kept():
    """Undo the logging set-up done inside (Hydra's job logging: console and log-file handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:], root.level = handlers, level


def run_distill_in_process(
    *args: str, cwd: Path, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`run_distill` in this process: `distill_cli.cli.main(args)` in `cwd`, as a fresh `distill` process
    would run it (CI set, no traceback switch, no earlier run's failed jobs or sweeps, Hydra's logging
    undone afterwards), without the seconds of start-up. Returns the exit status and what it printed;
    a run still going after `timeout` seconds fails (a TimeoutError raised where it waits)."""
    from distill_cli.cli import main as cli
    from distill_cli.sweeps.callbacks import SweepWatch

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, _root_logger_kept(), _time_limit(timeout):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", sys.argv[:])
        patch.setattr(sys, "stdout", out)
        patch.setattr(sys, "stderr", err)
        patch.setattr(logging, "raiseExceptions", logging.raiseExceptions)
        patch.setattr(cli, "FAILED_JOBS", [])
        patch.setattr(SweepWatch, "sweeps", [])
        patch.setenv("CI", "1")
        for name in ("HYDRA_FULL_ERROR", "DISTILL_TRACEBACK"):  # main sets them: set now, so undone after
            patch.setenv(name, "0")
            patch.delenv(name)
        code = cli.main(list(args))
    result = subprocess.CompletedProcess(["distill", *args], code, out.getvalue(), err.getvalue())
    return _checked(result) if check else result


# a quick recipe for the end-to-end sweep tests
FAST_KD = ["teacher.kwargs.width=8", "epochs=2", "teacher_epochs=2", "student.kwargs.hidden=[8]"]


def assert_trained_once(summaries: list[dict], runs: list[Path]) -> None:
    """One of the kd runs trained the teacher and one the student-alone baseline (each into its own
    run folder); every other run used those two from the cache."""
    for part in ("teacher", "baseline"):
        assert sorted(s[part]["source"] for s in summaries) == ["cache"] * (len(summaries) - 1) + ["trained"]
        assert len({s[part]["checkpoint"] for s in summaries}) == 1
        assert len([run for run in runs if (run / part / "metrics.jsonl").is_file()]) == 1


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TIMING_KEYS = {"images_per_s", "seconds"}


def metrics_without_timing(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run without the fields that vary between identical runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_jsonl(run_dir / "metrics.jsonl")]


def same_runs(run, reference) -> None:
    """Two run folders hold the same training: metrics, summary results and best/last weights."""
    assert metrics_without_timing(run) == metrics_without_timing(reference)
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (run, reference)]
    assert summaries[0]["status"] == "completed"
    assert comparable_results(summaries[0]) == comparable_results(summaries[1])
    for name in ("best.pt", "last.pt"):
        weights = [load_checkpoint(folder / name)["state_dict"] for folder in (run, reference)]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[1])


def close_runs(stacked_dir, sequential_dir) -> None:
    """The same training up to float order: metrics, weights and BatchNorm statistics."""
    rows = [metrics_without_timing(folder) for folder in (stacked_dir, sequential_dir)]
    assert len(rows[0]) == len(rows[1])
    for mine, theirs in zip(*rows):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), key
    weights = [load_checkpoint(folder / "last.pt")["state_dict"] for folder in (stacked_dir, sequential_dir)]
    for key, value in weights[1].items():
        assert torch.allclose(weights[0][key].float(), value.float(), rtol=1e-3, atol=1e-4), key


def write_png(image: torch.Tensor, path: Path) -> None:
    """Save a uint8 (3, H, W) tensor as a PNG."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def write_image_tree(root: Path, split: str, per_class: int, size: int = 10, classes=("cat", "dog", "eel")) -> None:
    """`root/split/<class>/<i>.png`: random images with a class-coloured channel, seeded by the split name."""
    generator = torch.Generator().manual_seed(zlib.crc32(split.encode()))
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
            image[label] = 255  # a class-coloured channel
            write_png(image, folder / f"{i}.png")


def compose_config(command: str, overrides: list[str]):
    """The config `distill <command> <overrides>` composes (Hydra's compose API: no run folder)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=command, overrides=overrides)


def small_train_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A quick teacher recipe on digits (a few epochs of a narrow CNN)."""
    values = dict(
        teacher=TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}),
        epochs=2,
        teacher_cache=str(tmp_path / "cache"),
        device=CPU_DEVICE,  # exact comparisons need the CPU's determinism, also where a GPU is present
    )
    return TrainConfig(**{**values, **overrides})


def small_kd_config(tmp_path: Path, **overrides) -> KDConfig:
    values = dict(
        teacher=TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}),
        student=ModelConfig(arch="mlp", kwargs={"hidden": [4]}),
        epochs=2,
        teacher_epochs=2,
        teacher_cache=str(tmp_path / "cache"),
        device=CPU_DEVICE,
    )
    return KDConfig(**{**values, **overrides})


@pytest.fixture
def quiet_results(monkeypatch):
    """Skip printing the rich results table in in-process task tests."""
    import distill_cli.runs.fused
    import distill_cli.runs.kd
    import distill_cli.runs.train

    for module in (distill_cli.runs.train, distill_cli.runs.kd, distill_cli.runs.fused):
        monkeypatch.setattr(module, "print_results", lambda summary, per_class=False: None)


def fused_group(root: Path, student: ModelConfig) -> list[KDConfig]:
    """Three kd jobs of one fused group: a teacher trained into `root/teacher`, `student`, augmented data (the
    teacher runs every step); they differ in T, alpha and the student's learning rate."""
    from distill_cli.runs.train import run_train

    teacher_dir = root / "teacher"
    run_train(small_train_config(root), teacher_dir)
    teacher = TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}, checkpoint=str(teacher_dir / "best.pt"))
    base = small_kd_config(root, teacher=teacher, student=student, baseline=False)
    base = replace(base, dataset=replace(base.dataset, augment=True))
    return [
        replace(base, T=2.0, alpha=0.5),
        replace(base, T=4.0, alpha=0.9),
        replace(base, T=4.0, alpha=0.5, optimizer=replace(base.optimizer, lr=0.05)),
    ]


def dropout_train_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A quick recipe that draws randomness every step: dropout (torch's RNG) and on-device
    augmentation (the loader's generator)."""
    teacher = TeacherConfig(arch="mlp", kwargs={"hidden": [32], "dropout": 0.2})
    cfg = small_train_config(tmp_path, teacher=teacher, epochs=3, **overrides)
    return replace(cfg, dataset=replace(cfg.dataset, augment=True))


def on_training_step(monkeypatch, call: int, action, factory: str = "cross_entropy_step", module=None) -> None:
    """Make the `call`-th training step (counted from 1, over all epochs) that the step factory
    `<module>.<factory>` builds (`cross_entropy_step` in `distill_cli.runs.train`, the default; `kd_step` (in
    `distill_cli.kd.wiring`, the default for it) for a
    kd student) run `action(parts) -> parts`."""
    import distill_cli.kd.wiring
    import distill_cli.runs.train

    module = module or (distill_cli.kd.wiring if factory == "kd_step" else distill_cli.runs.train)
    real = getattr(module, factory)
    counter = itertools.count(1)

    def patched(*args, **kwargs):
        step = real(*args, **kwargs)

        def counted(batch, epoch):
            parts, logits = step(batch, epoch)
            return (action(parts) if next(counter) == call else parts), logits

        return counted

    monkeypatch.setattr(module, factory, patched)


def train_stopped_mid_epoch(monkeypatch, cfg: TrainConfig, run_dir: Path, signum: int = signal.SIGINT) -> Interrupted:
    """`run_train(cfg, run_dir)` sent `signum` (Ctrl-C's SIGINT, or SIGTERM) at its 25th step (a 20-step epoch:
    epoch 2, step 5): the `Interrupted` it raised, once its last.pt is saved. The test's patches are undone after."""
    from distill_cli.runs.train import run_train

    def interrupt(parts):
        os.kill(os.getpid(), signum)
        return parts

    on_training_step(monkeypatch, 25, interrupt)
    with pytest.raises(Interrupted) as stopped:
        run_train(cfg, run_dir)
    monkeypatch.undo()
    return stopped.value


def comparable_results(summary: dict) -> dict:
    """What two identical runs share in their summaries (not paths or timings)."""
    varying = {"checkpoint", "inference_images_per_s"}  # paths and timings
    return {
        role: {k: v for k, v in summary[role].items() if k not in varying}
        for role in ("teacher", "student", "baseline")
        if summary.get(role)
    }


def table_rows(table) -> list[list[str]]:
    """The body rows of a Rich table, as the cells' text, the way a wide terminal shows them."""
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(table)
    lines = console.export_text().splitlines()
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
