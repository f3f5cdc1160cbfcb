"""scripts/reproduce_cifar10.sh: every command it starts composes and validates as a distill config (with a recording
stand-in for `distill`). (The whole script at 1 epoch on a tiny image tree takes minutes on 2 CPU cores: five distill
processes, resnet56 among them; it is not part of the suite.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from distill_cli.core.config import validate_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_cifar10.sh"


def _script(tmp_path: Path, distill: str, *args: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CI": "1", "OUT_DIR": str(tmp_path / "out"), "DISTILL": distill, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=600, check=False)


def _recorder(tmp_path: Path, body: str) -> str:
    script = tmp_path / "record"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _recording(tmp_path: Path, calls: Path) -> str:
    """A stand-in for `distill` that appends its arguments to `calls` as one JSON line, in one write: the runs of a
    step start side by side, and a line written in pieces could interleave with another's."""
    write = "import json, os, sys; os.write(os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT), (json.dumps(sys.argv[2:]) + chr(10)).encode())"
    return _recorder(tmp_path, f"{sys.executable} -c '{write}' {calls} \"$@\"")


@pytest.mark.parametrize("fused", ["0", "1"])
def test_every_command_of_the_reproduction_composes(tmp_path, fused):
    """The commands (2 seeds here): resnet56 and each seed's resnet20 trained side by side, then each seed's kd run
    from that resnet56 (or one fused-launcher sweep over the seeds), all with the recipe's keys."""
    calls = tmp_path / "calls.jsonl"
    result = _script(tmp_path, _recording(tmp_path, calls), "--", "device.cuda_graphs=true", SEEDS="0 1", EPOCHS="30", KD_FUSED=fused)
    assert result.returncode == 0, result.stderr
    commands = [json.loads(line) for line in calls.read_text().splitlines()]
    # started side by side: their order in the record is the order they ran in
    assert sorted(command[:3] for command in commands[:3]) == [
        ["train", "experiment=cifar10_resnet20", "seed=0"], ["train", "experiment=cifar10_resnet20", "seed=1"],
        ["train", "experiment=cifar10_resnet56", "seed=0"],
    ]
    kd = commands[3:]
    assert len(kd) == (1 if fused == "1" else 2) and all(command[0] == "kd" for command in kd)
    for command in commands:
        # Hydra's launch settings (-m, the launcher, run folders) are not part of the config
        overrides = [arg for arg in command[1:] if not arg.startswith(("-m", "hydra"))]
        overrides = [arg.replace("seed=0,1", "seed=0") for arg in overrides]
        cfg = validate_config(command[0], compose_config(command[0], overrides))
        assert (cfg.epochs, cfg.batch_size, cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.device.cuda_graphs) == (30, 64, 0.1, 1e-4, "true")
        assert [round(m * 182) for m in cfg.optimizer.milestones] == [91, 136] and cfg.dataset.name == "imagefolder"
        if command[0] == "kd":
            assert cfg.teacher.checkpoint == str(tmp_path / "out" / "resnet56" / "best.pt") and cfg.student.kwargs["depth"] == 20


@pytest.mark.parametrize("seed", [0, 2])
def test_the_kd_runs_find_their_baseline_in_the_cache_the_resnet20_runs_fill(seed):
    """Step 2 compares each kd run with the resnet20 step 1 trained alone with its seed: the kd preset's baseline
    recipe (the student alone, as kd would train it) is the resnet20 preset's, so the kd run takes it from the cache."""
    from distill_cli.runs.teacher_cache import teacher_recipe
    from distill_cli.runs.teachers import baseline_training_config

    kd = validate_config("kd", compose_config("kd", ["experiment=cifar10_resnet56_resnet20", f"seed={seed}", "epochs=30"]))
    alone = validate_config("train", compose_config("train", ["experiment=cifar10_resnet20", f"seed={seed}", "epochs=30"]))
    assert teacher_recipe(baseline_training_config(kd)) == teacher_recipe(alone)


@pytest.mark.parametrize("side_by_side, overlapping", [("1", True), ("0", False)])
def test_side_by_side_0_runs_the_commands_one_after_another(tmp_path, side_by_side, overlapping):
    """SIDE_BY_SIDE=0: each command of a step starts after the last one ended (the default starts them together);
    a failed command still fails the script."""
    spans = tmp_path / "spans.txt"
    recorder = tmp_path / "record"
    recorder.write_text(f"#!/bin/sh\nstart=$(date +%s.%N)\nsleep 0.3\necho \"$start $(date +%s.%N)\" >> {spans}\n")
    recorder.chmod(0o755)
    result = _script(tmp_path, str(recorder), SEEDS="0 1", EPOCHS="2", SIDE_BY_SIDE=side_by_side)
    assert result.returncode == 0, result.stderr
    step_one = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())[:3]
    assert any(start < end for (_, end), (start, _) in zip(step_one, step_one[1:])) is overlapping
    failing = tmp_path / "fail"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    assert _script(tmp_path, str(failing), SEEDS="0", EPOCHS="2", SIDE_BY_SIDE=side_by_side).returncode != 0


def _completed_summary(run_dir: Path, accuracy: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "completed", "command": "train", "teacher": {"test_acc_best": accuracy}, "published": {"teacher": 93.57}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def test_a_second_start_continues_the_runs_that_did_not_complete(tmp_path):
    """Started again on the same OUT_DIR, the script leaves a completed run alone and starts every other one with
    resume=true (which continues from its last.pt, or starts it when it has none)."""
    calls = tmp_path / "calls.jsonl"
    _completed_summary(tmp_path / "out" / "resnet56", 0.93)
    result = _script(tmp_path, _recording(tmp_path, calls), SEEDS="0 1", EPOCHS="30")
    assert result.returncode == 0, result.stderr
    commands = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [command[1] for command in commands if command[0] == "train"] == ["experiment=cifar10_resnet20"] * 2
    assert len(commands) == 4 and all("resume=true" in command for command in commands)
    assert "resnet56: completed before, not run again" in result.stdout


def test_sigterm_waits_for_every_run_to_save_its_checkpoint(tmp_path):
    """`timeout` sends SIGTERM to the script and its runs; each run saves a mid-epoch checkpoint before it exits, and
    the script returns only once they all have (so what is packed after it is their last state)."""
    saved = tmp_path / "saved"
    recorder = _recorder(tmp_path, f"trap 'sleep 1; echo saved >> {saved}; exit 143' TERM\nsleep 30 &\nwait")
    environment = {**os.environ, "OUT_DIR": str(tmp_path / "out"), "DISTILL": recorder, "SEEDS": "0 1", "EPOCHS": "2"}
    result = subprocess.run(["timeout", "2", "bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 124
    assert saved.read_text().splitlines() == ["saved"] * 3  # resnet56 and both resnet20, started side by side


def test_pack_keeps_what_a_continuation_needs_in_parts_and_unpack_puts_it_back(tmp_path):
    """--pack: the whole OUT_DIR in parts of at most PART_BYTES, less the files a continuation never reads (every
    last.prev.pt, a completed run's last.pt, lock files); --unpack restores it under another OUT_DIR as it was; the
    table counts the completed runs and says how far the others got."""
    out = tmp_path / "out"
    _completed_summary(out / "resnet56", 0.9357)
    (out / "resnet20_seed0").mkdir()
    (out / "resnet20_seed0" / "summary.json").write_text(json.dumps({"status": "interrupted", "command": "train"}))
    (out / "resnet20_seed0" / "metrics.jsonl").write_text('{"seconds": 30}\n{"seconds": 30}\n')
    (out / "resnet56" / "metrics.jsonl").write_text('{"seconds": 60}\n' * 3)
    (out / "teacher_cache" / "resnet_cifar-1").mkdir(parents=True)
    (out / "teacher_cache" / "resnet_cifar-1.lock").touch()
    for name in ("resnet56/best.pt", "resnet56/last.pt", "resnet56/last.prev.pt", "resnet20_seed0/last.pt",
                 "resnet20_seed0/last.prev.pt", "resnet20_seed0/best.pt", "teacher_cache/resnet_cifar-1/teacher.pt"):
        (out / name).write_bytes(os.urandom(600_000))
    packed = tmp_path / "packed"
    assert _script(tmp_path, "distill", "--pack", str(packed), PART_BYTES="1M").returncode == 0
    parts = sorted(packed.iterdir())
    assert len(parts) > 1 and all(part.stat().st_size <= 2**20 for part in parts)
    restored = tmp_path / "restored"
    result = _script(tmp_path, "distill", "--unpack", str(packed), OUT_DIR=str(restored))
    assert result.returncode == 0, result.stderr
    files = {str(path.relative_to(restored)) for path in restored.rglob("*") if path.is_file()}
    kept = {path for path in files if (out / path).read_bytes() == (restored / path).read_bytes()}
    assert kept == files == {
        "resnet56/summary.json", "resnet56/metrics.jsonl", "resnet56/best.pt", "resnet20_seed0/summary.json",
        "resnet20_seed0/metrics.jsonl", "resnet20_seed0/last.pt", "resnet20_seed0/best.pt",
        "teacher_cache/resnet_cifar-1/teacher.pt",
    }
    table = _script(tmp_path, "distill", "--table", OUT_DIR=str(restored), EPOCHS="3")
    assert "| resnet56 alone | 1 | 93.57 | 93.57-93.57 | 93.57 | 3.0 |" in table.stdout
    assert "Not finished yet: resnet20_seed0 2/3 epochs (interrupted)" in table.stdout
