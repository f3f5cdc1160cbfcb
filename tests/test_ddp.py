"""Data-parallel training (distributed.py): real processes with gloo on the CPU, started by torchrun.

`distill kd device.processes=2 batch_size=32` must train exactly what one process does with
batch_size=64 (same data order, same augmentation draws, gradients averaged), and survive Ctrl-C,
kill -9 and a failing rank the way one process does. Faults are injected into the ranks (and only
there) by a `sitecustomize` module on their PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import (
    DISTILL,
    compose_config,
    metrics_without_timing,
    read_jsonl,
    run_distill,
    small_train_config,
)

from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import validate_config
from distill_cli.core.errors import DistillError
from distill_cli.data import Augment, DatasetInfo
from distill_cli.data.loader import DeviceLoader, StreamLoader
from distill_cli.runs.kd import run_kd
from distill_cli.runs.teacher_cache import teacher_recipe
from distill_cli.runs.train import run_train

# ---------------------------------------------------------------- sharded loaders (in-process)


class _Split:
    """An in-memory split of random uint8 images."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, position: int) -> torch.Tensor:
        return self.images[position]


INFO = DatasetInfo(name="t", num_classes=3, channels=3, image_size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3, class_names=("a", "b", "c"))


@pytest.mark.parametrize("loader_class", [DeviceLoader, StreamLoader])
def test_ranks_take_disjoint_halves_of_every_batch_augmented_as_one_process_would(loader_class):
    """Over two epochs, rank 0's and rank 1's batches of 4 are the two halves of one process's batch of 8:
    the same images, augmented the same way, so each rank sees a disjoint half of every epoch."""
    split = _Split(37)
    options = dict(shuffle=True, drop_last=True, seed=3, augment=Augment(pad=2, flip=True, color_jitter=0.4))
    if loader_class is StreamLoader:
        options["workers"] = 0
    one = loader_class(split, INFO, 8, torch.device("cpu"), **options)
    ranks = [loader_class(split, INFO, 4, torch.device("cpu"), shard=(rank, 2), **options) for rank in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
    for _ in range(2):
        seen = []
        for whole, *halves in zip(one, *ranks):
            assert torch.equal(torch.cat([half.index for half in halves]), whole.index)
            assert torch.equal(torch.cat([half.images for half in halves]), whole.images)
            seen += [set(half.index.tolist()) for half in halves]
        assert len(set().union(*seen)) == sum(map(len, seen)) == 32  # disjoint


def test_a_teacher_trained_by_several_processes_is_another_recipe(tmp_path):
    """Its step's batch is batch_size x processes, so the cache keeps it apart from one process's."""
    cfg = small_train_config(tmp_path)
    assert teacher_recipe(cfg, 1) == teacher_recipe(cfg)
    assert teacher_recipe(cfg, 2) != teacher_recipe(cfg) and teacher_recipe(cfg, 2)["processes"] == 2


def _world_primitives(rank: int, init_file: str, results) -> None:
    """Rank `rank` of 2 (gloo): what the World primitives give each rank."""
    import torch.distributed as dist

    from distill_cli.core.world import World
    from distill_cli.training.data_parallel import average_gradients
    from distill_cli.training.loop import EpochTotals

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    world = World(rank=rank, size=2, joined=True)
    try:
        layer = torch.nn.Linear(2, 1)
        layer.weight.grad = torch.full((1, 2), float(rank + 1))  # 1 on rank 0, 2 on rank 1
        layer.bias.grad = torch.tensor([4.0 * rank])
        average_gradients(layer, world)
        gathered = world.gathered(torch.tensor([[rank, 10 + rank]])).tolist()
        totals = EpochTotals(torch.device("cpu"))
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)
        for _ in range(3):
            totals.add({"loss": loss}, torch.eye(4)[: 2 + rank], torch.arange(2 + rank))
        try:
            world.on_main(lambda: (_ for _ in ()).throw(DistillError("only rank 0 sees this file")))
            refused = None
        except DistillError as error:
            refused = str(error)
        results.put((rank, layer.weight.grad.tolist(), layer.bias.grad.tolist(), totals.read(layer, world), refused, world.any(rank == 1), gathered))
    finally:
        dist.destroy_process_group()


def test_world_averages_gradients_sums_epochs_and_shares_rank_0s_errors(tmp_path):
    """Two real gloo processes: a method's gradients are averaged; epoch totals are summed (images, correct,
    bad steps) with the earliest bad step of any rank; a DistillError on rank 0 is raised on every rank; every
    rank's rows are gathered in rank order."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_world_primitives, args=(rank, str(tmp_path / "init"), results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    got = dict((result[0], result[1:]) for result in (results.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for weight, bias, read, refused, any_rank_1, gathered in got.values():
        assert weight == [[1.5, 1.5]] and bias == [2.0]
        assert read["images"] == 3 * 2 + 3 * 3 and read["train_acc"] == 1.0
        assert read["bad_steps"] == 3 and read["first_bad"] == 0  # rank 1's, the only rank with bad steps
        assert read["losses"]["loss"] == 1.0  # the finite steps' mean
        assert refused == "only rank 0 sees this file" and any_rank_1
        assert gathered == [[0, 10], [1, 11]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["device.processes=0"], "device.processes: must be >= 1, got 0"),
        (["device.processes=2", "device.sync_batchnorm=true", "device=cpu"], "device.sync_batchnorm: SyncBatchNorm runs on CUDA GPUs only"),
        (["device.processes=2", "device.type=cuda:1"], "device.type=cuda:1 with 2 processes"),
    ],
)
def test_what_several_processes_cannot_do_is_refused_before_any_starts(tmp_path, monkeypatch, capsys, overrides, message):
    from distill_cli.cli import main as cli

    monkeypatch.chdir(tmp_path)
    for variable in ("HYDRA_FULL_ERROR", "DISTILL_TRACEBACK"):  # main() sets them for Hydra: undone after the test
        monkeypatch.setenv(variable, "0")
    assert cli.main(["kd", *overrides]) == 1
    assert capsys.readouterr().err.startswith(f"distill kd: error: {message}")
    assert not list(tmp_path.glob("outputs/*/*/torchrun.log"))  # no process was started


# ---------------------------------------------------------------- real processes (torchrun, gloo)

INJECT = '''
import os, time
if "RANK" in os.environ:
    import distill_cli.training.loop as loop
    train_epoch = loop.train_epoch

    def injected(model, method, step, epoch, *args, **kwargs):
        failing = os.environ.get("FAIL_EPOCH") == str(epoch) and os.environ.get("FAIL_LABEL", "student") == args[4].label
        if failing and os.environ["RANK"] == "1":
            raise RuntimeError("injected failure")

        def slowed(batch, e):
            if e >= int(os.environ.get("SLOW_FROM_EPOCH", "99")):
                time.sleep(0.1)
            return step(batch, e)

        return train_epoch(model, method, slowed, epoch, *args, **kwargs)

    loop.train_epoch = injected

    import distill_cli.core.world as world
    root_cause = world.World.root_cause

    def slow_root_cause(self, message, error):  # the launcher's SIGTERM arrives while the error is handled
        time.sleep(float(os.environ.get("ROOT_CAUSE_DELAY", "0")) * (os.environ["RANK"] == "0"))
        return root_cause(self, message, error)

    world.World.root_cause = slow_root_cause

    if "EXIT_MARKS" in os.environ:  # a file for each rank whose interpreter ran its exit handlers
        import atexit
        atexit.register(lambda: open(os.path.join(os.environ["EXIT_MARKS"], os.environ["RANK"]), "w").close())
'''


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """A teacher checkpoint, the kd overrides that use it (augmented, no dropout: the ranks' own random
    draws would differ from one process's), and their run in 2 processes of batch 32 ("two")."""
    root = tmp_path_factory.mktemp("ddp")
    teacher_dir = root / "teacher"
    run_train(small_train_config(root), teacher_dir)
    overrides = [
        f"teacher.checkpoint={teacher_dir / 'best.pt'}", "teacher=cnn", "teacher.kwargs.width=8", "teacher.kwargs.blocks=2",
        "student=mlp", "student.kwargs.hidden=[8]", "student.kwargs.dropout=0", "dataset.augment=true",
        "baseline=false", "epochs=3", "device=cpu",
    ]
    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(INJECT)
    (root / "exit_marks").mkdir()
    process = _start(root, ["kd", *overrides, "device.processes=2", "batch_size=32", "hydra.run.dir=two"], EXIT_MARKS=str(root / "exit_marks"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return root, overrides


def _start(root: Path, args: list[str], **env) -> subprocess.Popen:
    """`distill` in its own process group (as a terminal runs it), with the fault injection on the ranks' path."""
    path = os.pathsep.join(filter(None, [str(root / "inject"), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [str(DISTILL), *args], cwd=root, env={**os.environ, "CI": "1", "PYTHONPATH": path, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_epochs(process: subprocess.Popen, run: Path, epochs: int) -> None:
    while not (run / "metrics.jsonl").is_file() or len(read_jsonl(run / "metrics.jsonl")) < epochs:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _one_line(process: subprocess.Popen) -> tuple[int, str]:
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return process.returncode, lines[0]


@pytest.mark.slow
def test_two_processes_of_half_the_batch_train_what_one_process_does(ddp, tmp_path, quiet_results):
    """Same batches, augmented alike, gradients averaged, metrics summed over the ranks: the runs agree to
    float rounding (the teacher's logits are computed per rank, the loss reduced in another order)."""
    root, overrides = ddp
    two, one = root / "two", tmp_path / "one"
    run_kd(validate_config("kd", compose_config("kd", [*overrides, "batch_size=64"])), one)
    rows_two, rows_one = metrics_without_timing(two), metrics_without_timing(one)
    assert len(rows_two) == len(rows_one) == 3
    for row_two, row_one in zip(rows_two, rows_one):
        assert row_two.keys() == row_one.keys()
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-7), key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert summary["student"]["test_acc_best"] == pytest.approx(json.loads((one / "summary.json").read_text())["student"]["test_acc_best"])
    assert not (root / "outputs").exists()  # one run folder: the ranks made none of their own


@pytest.mark.slow
def test_crd_in_two_processes_trains_what_one_process_does(ddp, tmp_path, quiet_results):
    """CRD's memory banks under data parallelism: each step's rows updated from both processes' embeddings, Z set from
    the mean over both, each rank's share of the negatives one process would draw for the whole batch; with Hinton's
    term too (alpha 0.5). The runs agree to float rounding, the banks in last.pt included."""
    root, overrides = ddp
    crd = [*overrides, "loss=crd", "loss.negatives=64", "alpha=0.5", "epochs=2"]
    run_distill("kd", *crd, "device.processes=2", "batch_size=32", "hydra.run.dir=crd_two", cwd=root)
    one = tmp_path / "one"
    run_kd(validate_config("kd", compose_config("kd", [*crd, "batch_size=64"])), one)
    rows_two, rows_one = metrics_without_timing(root / "crd_two"), metrics_without_timing(one)
    assert len(rows_two) == len(rows_one) == 2 and rows_one[0]["loss/crd"] > 0
    for row_two, row_one in zip(rows_two, rows_one):
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-7), key
    states = [load_checkpoint(run / LAST)["training"]["method"] for run in (root / "crd_two", one)]
    names = [name for name in states[1] if name.endswith(("student_bank", "teacher_bank", "normaliser"))]
    assert len(names) == 3, list(states[1])
    for name in names:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [["generations=2"], ["assistants=[mlp_small]"], ["teacher=ensemble", "teacher.checkpoints=[{teacher},{teacher}]", "teacher.weights=[2,1]"],
     ["peers=[mlp_small,mlp_small]", "alpha=0.5", "T=1"]],
    ids=["born-again", "assistants", "ensemble", "mutual"],
)
def test_training_modes_in_two_processes_train_what_one_process_does(ddp, tmp_path, quiet_results, mode):
    """Born-again generations and a teacher-assistant chain are kd runs one after another, an ensemble a teacher: in
    2 processes of batch 32 each run trains what it trains in one process of batch 64 (to float rounding), and the
    summary is the same (rank 0 reads the members' files and tests them)."""
    root, overrides = ddp
    mode = [arg.format(teacher=root / "teacher" / "best.pt") for arg in mode]
    own_teachers = mode[0].startswith(("teacher=ensemble", "peers="))  # members or peers replace the fixture's teacher
    chain = [*(o for o in overrides if not (own_teachers and o.startswith(("teacher.checkpoint", "teacher=", "teacher.kwargs")))), *mode, "epochs=2"]
    two = root / f"two_{mode[0].split('=')[0]}"
    run_distill("kd", *chain, "device.processes=2", "batch_size=32", f"hydra.run.dir={two}", cwd=root)
    one = tmp_path / "one"
    run_kd(validate_config("kd", compose_config("kd", [*chain, "batch_size=64", f"teacher_cache={root / 'outputs' / 'teacher_cache'}"])), one)
    parts = sorted(path.parent.relative_to(one) for path in one.rglob("metrics.jsonl"))
    assert len(parts) == (1 if own_teachers else 2), parts  # gen1 and gen2, the assistant and the student
    for part in parts:
        rows_two, rows_one = metrics_without_timing(two / part), metrics_without_timing(one / part)
        assert len(rows_two) == len(rows_one) == 2
        for row_two, row_one in zip(rows_two, rows_one):
            for key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-7), (part, key)
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (two, one)]
    assert summaries[0]["processes"] == 2 and summaries[0]["mode"] == summaries[1]["mode"]
    assert summaries[0]["student"]["test_acc_best"] == pytest.approx(summaries[1]["student"]["test_acc_best"])
    for key in ("generations_ensemble", "chain"):
        assert (key in summaries[0]) is (key in summaries[1])
    if "chain" in summaries[0]:  # an assistant distilled by 2 processes is cached as its own recipe
        assert summaries[0]["chain"][1]["source"] == "trained"
        recipes = [json.loads(path.read_text()) for path in (root / "outputs" / "teacher_cache").rglob("recipe.json")]
        assert {(recipe.get("processes"), recipe["batch_size"]) for recipe in recipes if "kd" in recipe} == {(2, 32), (None, 64)}


@pytest.mark.slow
def test_ctrl_c_then_kill_9_then_resume_matches_the_uninterrupted_run(ddp):
    """Ctrl-C stops every rank at one step of epoch 2 and saves it (each rank's partial sums and random
    state); resumed, then every process killed -9 in epoch 3; resumed again: the same metrics, exactly."""
    root, overrides = ddp
    process = _start(root, ["kd", *overrides, "device.processes=2", "batch_size=32", "hydra.run.dir=chain"], SLOW_FROM_EPOCH="2")
    _wait_for_epochs(process, root / "chain", 1)
    time.sleep(0.3)  # a few steps into epoch 2
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's process group
    status, line = _one_line(process)
    assert status == 130 and "interrupted by SIGINT (student epoch 2 step" in line and "distill resume" in line
    saved = load_checkpoint(root / "chain" / LAST)["training"]
    assert saved["partial"] is not None and len(saved["ranks"]) == 2 and saved["world_size"] == 2

    process = _start(root, ["resume", "chain"], SLOW_FROM_EPOCH="3")
    _wait_for_epochs(process, root / "chain", 2)
    for pid in _tree(process.pid):
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    assert json.loads((root / "chain" / "summary.json").read_text())["status"] == "interrupted"  # from the Ctrl-C

    run_distill("resume", "chain", cwd=root)
    assert metrics_without_timing(root / "chain") == metrics_without_timing(root / "two")


@pytest.mark.slow
def test_ranks_exit_without_the_interpreters_finalization(ddp):
    """The fixture's completed 2-process run: its ranks exited without the interpreter's finalization
    (`core.processes.exit_process`), where torch's distributed threads torn down have aborted a rank (2 runs in about
    40): the exit handler each rank registered never ran."""
    root, _ = ddp
    assert json.loads((root / "two" / "summary.json").read_text())["status"] == "completed"
    assert list((root / "exit_marks").iterdir()) == []


@pytest.mark.slow
def test_a_rank_raising_stops_the_job_in_one_line_naming_it(ddp):
    root, overrides = ddp
    start = time.monotonic()
    process = _start(root, ["kd", *overrides, "device.processes=2", "batch_size=32", "hydra.run.dir=failed"], FAIL_EPOCH="2")
    status, line = _one_line(process)
    assert time.monotonic() - start < 60
    assert status == 1 and line == "distill kd: error: rank 1: RuntimeError: injected failure (set HYDRA_FULL_ERROR=1 for the traceback)"
    summary = json.loads((root / "failed" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("rank 1: RuntimeError")
    assert load_checkpoint(root / "failed" / LAST)["epoch"] == 1  # the last checkpoint is intact


@pytest.mark.slow
def test_torchrun_of_distill_itself_trains_teacher_and_baseline_with_every_rank(ddp, tmp_path, quiet_results, monkeypatch):
    """`torchrun -m distill_cli kd`: rank 0 makes the one run folder (outputs/<date>/<time>_kd) and hands the
    others the config; all ranks train the teacher and the baseline (cached as 2-process recipes), then the
    student, until rank 1 fails in epoch 3: rank 0's summary names rank 1's error, not the lost connection.
    Its last.pt cannot be resumed by one process."""
    root, overrides = ddp
    overrides = [o for o in overrides if not o.startswith(("teacher.checkpoint", "baseline"))] + ["teacher_epochs=2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    path = os.pathsep.join(filter(None, [str(root / "inject"), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "distill_cli", "kd", *overrides, "batch_size=32"],
        cwd=tmp_path, env={**os.environ, "CI": "1", "PYTHONPATH": path, "FAIL_EPOCH": "3", "ROOT_CAUSE_DELAY": "2"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    [day] = (tmp_path / "outputs").glob("2*")
    [run] = day.iterdir()  # one run folder for both ranks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "rank 1: RuntimeError: injected failure (set HYDRA_FULL_ERROR=1 for the traceback)"
    for part in ("teacher", "baseline"):
        trained = json.loads((run / part / "summary.json").read_text())
        assert trained["status"] == "completed" and trained["processes"] == 2
        assert json.loads((tmp_path / trained["teacher_cache"]).with_name("recipe.json").read_text())["processes"] == 2
    assert len(read_jsonl(run / "metrics.jsonl")) == 2

    monkeypatch.chdir(tmp_path)
    cfg = validate_config("kd", compose_config("kd", [*overrides, "batch_size=32"]))
    with pytest.raises(DistillError, match="written by 2 training process.*this run has 1"):
        run_kd(replace(cfg, resume=True), run)


@pytest.mark.slow
def test_every_rank_reads_the_one_teacher_view_store(ddp):
    """cache_teacher=views in 2 processes: rank 0 builds one store, both ranks read it, and the run trains what
    the run with the teacher running every step does (to float rounding: other batches computed the logits)."""
    root, overrides = ddp
    run_distill("kd", *overrides, "device.processes=2", "batch_size=32", "cache_teacher=views", "hydra.run.dir=views", cwd=root)
    assert json.loads((root / "views" / "summary.json").read_text())["teacher_supply"] == "teacher views"
    assert len(list(root.glob("outputs/teacher_cache/views/*/logits.pt"))) == 1
    for row_views, row_live in zip(metrics_without_timing(root / "views"), metrics_without_timing(root / "two"), strict=True):
        for key in row_live:
            assert row_views[key] == pytest.approx(row_live[key], rel=1e-4, abs=1e-6), key
