"""Shipping the student: `distill eval`, `distill export` and `kd export=`."""

import json
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SPEEDUP_TIMING, run_distill_in_process, small_kd_config
from torch import nn

import distill_cli.ship.export as export
import distill_cli.ship.quantize as quantize
from distill_cli.cli.main import main
from distill_cli.core.checkpoint import load_checkpoint, save_atomic
from distill_cli.core.config import DatasetConfig, ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo, load_dataset
from distill_cli.kd.teachers import Shared
from distill_cli.models import build_model
from distill_cli.models.checkpoints import model_from_checkpoint
from distill_cli.runs import student
from distill_cli.runs.student import compare_with_teacher
from distill_cli.ship.evaluate import (
    Measured,
    Timing,
    calibration_error,
    flops_per_image,
    peak_activation_bytes,
    quality,
    run_eval,
    timed,
)
from distill_cli.ship.programs import cpp_compiler
from distill_cli.training.setup import prepare_run

QUICK = Timing(calls=5, warmup=1, batch=16, repeats=2)
DIGITS = DatasetInfo("digits", 10, 1, (8, 8), (0.5,), (0.5,), tuple(str(i) for i in range(10)))


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory) -> Path:
    """A quick kd run folder on digits (teacher cnn width 8, student cnn width 4), exported to ONNX."""
    root = tmp_path_factory.mktemp("kd")
    args = [
        "kd", "epochs=2", "teacher_epochs=2", "device=cpu", "teacher.kwargs.width=8", "student=cnn",
        "student.kwargs.width=4", "export=onnx", f"teacher_cache={root / 'cache'}", f"hydra.run.dir={root / 'run'}",
    ]
    run_distill_in_process(*args, cwd=root)
    return root / "run"


def digits_test_images(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits test images, normalised as the loaders do, and their labels."""
    data = load_dataset(DatasetConfig())
    mean, std = torch.tensor(data.info.mean).view(1, -1, 1, 1), torch.tensor(data.info.std).view(1, -1, 1, 1)
    return (data.test.images[:count].float() / 255 - mean) / std, data.test.labels[:count]


# ---------------------------------------------------------------- measures


def test_flops_of_a_conv_net_match_a_hand_count():
    model = build_model(ModelConfig(arch="cnn", kwargs={"width": 4, "blocks": 2}), DIGITS, "model")
    # multiply-adds: 3x3 convs 1->4 and 4->4 on 8x8, max-pool, 4->8 and 8->8 on 4x4, then linear 8->10
    macs = 9 * 1 * 4 * 64 + 9 * 4 * 4 * 64 + 9 * 4 * 8 * 16 + 9 * 8 * 8 * 16 + 8 * 10
    assert flops_per_image(model, torch.zeros(5, 1, 8, 8)) == 2 * macs


def test_peak_activation_memory_counts_live_outputs_only():
    image = torch.zeros(3, 1, 8, 8)
    one_map = 4 * 8 * 8 * 4  # a conv output: 4 channels of 8x8 float32
    # the conv output and the ReLU's are alive together; an in-place ReLU adds nothing; views of the
    # input and the weights (Flatten, the linear's transpose) are not new memory
    assert peak_activation_bytes(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), image) == 2 * one_map
    assert peak_activation_bytes(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True)), image) == one_map
    chain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    assert peak_activation_bytes(chain, image) == 2 * one_map
    assert peak_activation_bytes(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), image) == 10 * 4


def test_calibration_error_by_hand():
    # bin [0.9, 0.97): confidence 0.9, 3 of 4 right (gap 0.15); bin [0.6, 0.67): confidence 0.6, 1 of 1 right (gap 0.4)
    probabilities = torch.tensor([[0.9, 0.1]] * 4 + [[0.4, 0.6]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert calibration_error(probabilities, labels) == pytest.approx((4 * 0.15 + 1 * 0.4) / 5)
    assert calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == pytest.approx(0)


def test_quality_confusion_matrix_and_per_class_accuracy():
    logits = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2, 2])]  # predicted classes
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    result = quality(logits, labels, ("a", "b", "c"))
    assert result["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]  # rows: true class
    assert result["test_acc"] == pytest.approx(4 / 6)
    assert result["test_acc_per_class"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    assert "test_acc_top5" not in result  # measured from 100 classes on


def test_quality_has_the_top5_accuracy_from_100_classes():
    """The label ranked 1st, 4th, 7th and 5th by its row's logits: top-1 0.25, top-5 0.75 (as `evaluate` counts it)."""
    logits = torch.arange(100, 0, -1, dtype=torch.float32).repeat(4, 1)
    result = quality(logits, torch.tensor([0, 3, 6, 4]), tuple(map(str, range(100))))
    assert (result["test_acc"], result["test_acc_top5"]) == (0.25, 0.75)


# ---------------------------------------------------------------- speed-up


class _BusyMachine:
    """A clock for timing without timing: a forward pass takes `cost` per image times the machine's load,
    which grows 5% with every pass (other jobs taking the cores)."""

    def __init__(self):
        self.now, self.load, self.batches = 0.0, 1.0, []

    def run(self, images: torch.Tensor, cost: float) -> None:
        self.now += cost * len(images) * self.load
        self.load *= 1.05
        self.batches.append(len(images))


MACHINE = _BusyMachine()


def _busy_forward(images: torch.Tensor, cost: float) -> torch.Tensor:
    MACHINE.run(images, cost)
    return images.flatten(1)[:, :10]


torch.fx.wrap("_busy_forward")  # traced (and BatchNorm-folded) as a call, run on every forward


class _Costly(nn.Module):
    """A network whose forward pass takes `cost` per image on MACHINE's clock."""

    def __init__(self, cost: float):
        super().__init__()
        self.cost = cost

    def forward(self, images):
        return _busy_forward(images, self.cost)


@pytest.mark.parametrize("teacher_cost, speedup", [(2.0, 2.0), (1.0, 1.0)], ids=["half the cost", "identical"])
def test_the_speed_up_holds_still_while_the_machine_gets_busier(tmp_path, monkeypatch, teacher_cost, speedup):
    """The kd summary's speed-up times teacher and student in turns at a fixed batch: a load that grows over
    the measurement falls on both alike (timed one after the other, it read 1.6x for 2x, 0.8x for 1x)."""
    global MACHINE
    MACHINE = _BusyMachine()
    monkeypatch.setattr(time, "perf_counter", lambda: MACHINE.now)
    monkeypatch.setattr(student, "SPEEDUP_TIMING", SPEEDUP_TIMING)  # as runs time it
    compute, _, loaders = prepare_run(small_kd_config(tmp_path))
    run = SimpleNamespace(compute=compute, loaders=loaders, shared=Shared())
    summary = {"teacher": {"params": 2}, "student": {"params": 1}}
    compare_with_teacher(run, summary, _Costly(teacher_cost), _Costly(1.0))
    assert summary["speedup"] == pytest.approx(speedup, rel=0.1)
    assert summary["speedup"] == pytest.approx(summary["student"]["inference_images_per_s"] / summary["teacher"]["inference_images_per_s"])
    assert set(MACHINE.batches) == {256}  # a fixed batch of test images (digits has 359), not the test split


def test_distill_eval_times_its_models_in_turns(monkeypatch):
    """eval's speed-up over the teacher on the same busy machine: latency and throughput of all models timed in turns."""
    global MACHINE
    MACHINE = _BusyMachine()
    monkeypatch.setattr(time, "perf_counter", lambda: MACHINE.now)
    measured = [Measured({"role": role}, {"cpu": _Costly(cost)}) for role, cost in (("teacher", 2.0), ("student", 1.0))]
    rows = timed(measured, torch.zeros(4, 1, 8, 8), QUICK)
    assert [row["speed"]["cpu"]["speedup"] for row in rows] == pytest.approx([1.0, 2.0], rel=0.1)
    assert rows[1]["speed"]["cpu"]["latency_ms_median"] == pytest.approx(rows[0]["speed"]["cpu"]["latency_ms_median"] / 2, rel=0.1)


# ---------------------------------------------------------------- eval


def test_eval_of_a_kd_run_folder_is_one_three_way_table(kd_run, tmp_path, capsys):
    summary = json.loads((kd_run / "summary.json").read_text())
    result = run_eval(kd_run, [], out=str(tmp_path / "eval"), gpu=False, timing=QUICK)
    rows = {row["role"]: row for row in result["models"]}
    assert list(rows) == ["teacher", "student", "student alone"]
    # each row measured the checkpoint its role names: the accuracies the run itself reported
    assert rows["teacher"]["test_acc"] == pytest.approx(summary["teacher"]["test_acc"], abs=1e-6)
    assert rows["student"]["test_acc"] == pytest.approx(summary["student"]["test_acc_best"], abs=1e-6)
    assert rows["student alone"]["test_acc"] == pytest.approx(summary["baseline"]["test_acc_best"], abs=1e-6)
    assert rows["teacher"]["params"] == summary["teacher"]["params"] > rows["student"]["params"]
    assert rows["teacher"]["macs"] > rows["student"]["macs"] > 0
    for row in rows.values():
        assert sum(map(sum, row["confusion"])) == result["test_images"] == 359
        timed = row["speed"]["cpu"]
        assert 0 < timed["latency_ms_median"] <= timed["latency_ms_p90"] and timed["throughput_images_per_s"] > 0
        assert timed["threads"] == torch.get_num_threads() and timed["throughput_batch"] == QUICK.batch
        # timed in turns with the teacher: the speed-up over it, the summary's figure as distill eval measures it
        assert timed["speedup"] == pytest.approx(timed["throughput_images_per_s"] / rows["teacher"]["speed"]["cpu"]["throughput_images_per_s"])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"][1]["name"] == "cnn(blocks=2, width=4)"
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "alone" in table and "MMACs/img" in table and "multiply-adds" in table and "speed-up" in table


def test_eval_of_one_checkpoint_through_the_cli(kd_run, tmp_path, capsys):
    code = main(["eval", str(kd_run / "best.pt"), f"out={tmp_path}", "gpu=false", "calls=3", "batch=8", "eval_batch_size=100"])
    assert code == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [row["role"] for row in result["models"]] == ["model"]
    assert result["timing"]["calls"] == 3 and result["models"][0]["speed"]["cpu"]["throughput_batch"] == 8


MODE_RUNS = {  # a training mode whose run folder has no top-level best.pt, and the roles eval reports
    "mutual learning": (["peers=[mlp_small,mlp]", "student.kwargs.dropout=0.0"], ["peer1", "peer2", "peer1 alone", "peer2 alone"]),
    "born-again": (["generations=2", "teacher.kwargs.width=8"], ["teacher", "generation 1", "generation 2", "student alone"]),
}


@pytest.mark.parametrize("mode", MODE_RUNS)
def test_eval_of_a_mutual_learning_or_born_again_run_folder_reports_each_peer_or_generation(mode, tmp_path):
    overrides, roles = MODE_RUNS[mode]
    args = ["kd", *overrides, "epochs=1", "teacher_epochs=1", "device=cpu", f"teacher_cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    run_distill_in_process(*args, cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result = run_eval(tmp_path / "run", [], out=str(tmp_path / "eval"), gpu=False, timing=QUICK)
    rows = {row["role"]: row for row in result["models"]}
    assert list(rows) == roles
    trained = summary.get("peers") or summary.get("generations")
    for row, entry in zip(result["models"], [summary["teacher"]] * ("teacher" in rows) + trained):
        assert row["test_acc"] == pytest.approx(entry.get("test_acc_best", entry.get("test_acc")), abs=1e-6)
    alone = [row for role, row in rows.items() if role.endswith("alone")]
    baselines = [peer["baseline"] for peer in summary["peers"]] if summary.get("peers") else [summary["baseline"]]
    assert [row["test_acc"] for row in alone] == pytest.approx([b["test_acc_best"] for b in baselines], abs=1e-6)


# ---------------------------------------------------------------- export


def test_kd_export_onnx_reproduces_pytorch_on_real_images(kd_run):
    import onnxruntime

    summary = json.loads((kd_run / "summary.json").read_text())
    assert summary["export"]["file"] == str(kd_run / "best.onnx") and summary["export"]["max_abs_diff"] <= 1e-4
    model, _ = model_from_checkpoint(kd_run / "best.pt", DIGITS)
    images, _ = digits_test_images()
    session = onnxruntime.InferenceSession(str(kd_run / "best.onnx"), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # the batch axis is dynamic
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
        torch.testing.assert_close(got, model(batch), atol=1e-4, rtol=0)


def test_export_pt2_reproduces_pytorch_on_real_images(kd_run, tmp_path, capsys):
    assert main(["export", str(kd_run), "format=pt2", f"out={tmp_path / 'student.pt2'}"]) == 0
    assert "same predicted class 100.00%" in capsys.readouterr().out
    record = json.loads((tmp_path / "student.pt2.json").read_text())
    assert record["class_agreement"] == 1.0 and record["max_abs_diff"] <= 1e-4 and record["images"] == 256
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    model, _ = model_from_checkpoint(kd_run / "best.pt", DIGITS)
    images, _ = digits_test_images()
    torch.testing.assert_close(program(images[:3]), model(images[:3]), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt2", "student.pt2.json"]
    # the program carries what distill eval needs to run it again: the same accuracy as the checkpoint
    result = run_eval(tmp_path / "student.pt2", [], out=str(tmp_path / "eval"), timing=QUICK)
    (row,) = result["models"]
    assert (row["role"], row["name"]) == ("fp32", "cnn(blocks=2, width=4)")
    assert row["test_acc"] == json.loads((kd_run / "summary.json").read_text())["student"]["test_acc_best"]


class _Branchy(nn.Module):
    """A forward that depends on the data: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_export_that_fails_to_trace_leaves_no_file(tmp_path):
    images, _ = digits_test_images(8)
    with pytest.raises(DistillError, match=r"model\.pt2: cannot export to pt2"):
        export.export_checked(_Branchy(), images, "pt2", tmp_path / "model.pt2", atol=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_export_that_does_not_match_pytorch_leaves_no_file(tmp_path, monkeypatch):
    model, _ = load_model_from_scratch()
    images, _ = digits_test_images(8)
    loaded = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda path, fmt: (lambda x: loaded(path, fmt)(x) + 1e-2))
    with pytest.raises(DistillError, match=r"differ from PyTorch's by 0\.01 > atol=0\.0001"):
        export.export_checked(model, images, "onnx", tmp_path / "model.onnx", atol=1e-4)
    assert list(tmp_path.iterdir()) == []


def load_model_from_scratch():
    return build_model(ModelConfig(arch="cnn", kwargs={"width": 4}), DIGITS, "model").eval(), "cnn"


def test_missing_export_packages_name_the_extra(monkeypatch, tmp_path, kd_run, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(kd_run / "best.pt"), "format=onnx", f"out={tmp_path / 'm.onnx'}"]) == 1
    err = capsys.readouterr().err
    assert err == "distill export: error: format=onnx needs onnxruntime: pip install 'distill-cli[export]'\n"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input


def _bad_input_message(capsys, *args) -> str:
    assert main(list(args)) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    return captured.err


def test_bad_checkpoints_are_one_line_naming_file_and_reason(kd_run, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert f"{foreign} is not a distill model checkpoint" in _bad_input_message(capsys, "eval", str(foreign))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((kd_run / "best.pt").read_bytes()[:2000])
    assert f"cannot load checkpoint {damaged}: " in _bad_input_message(capsys, "export", str(damaged), "format=onnx")
    other = load_checkpoint(kd_run / "best.pt")
    other.update(dataset="cifar10")
    save_atomic(other, tmp_path / "cifar.pt")
    message = _bad_input_message(capsys, "export", str(tmp_path / "cifar.pt"), "format=pt2")
    assert f"{tmp_path / 'cifar.pt'} was trained on cifar10 (10 classes), not on digits" in message
    assert "no such" not in _bad_input_message(capsys, "eval", str(tmp_path), "gpu=false")  # a folder, not a run
    assert "format='tflite': not an export format" in _bad_input_message(capsys, "export", str(kd_run / "best.pt"), "format=tflite")
    assert "calls=many: expected int" in _bad_input_message(capsys, "eval", str(kd_run), "calls=many")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar.pt", "damaged.pt", "foreign.pt"]


def test_kd_export_format_is_checked_before_training():
    from distill_cli.core.config import KDConfig

    with pytest.raises(DistillError, match="export"):
        KDConfig(student=ModelConfig(arch="mlp"), export="tflite")


# ---------------------------------------------------------------- quantize

# the stated bound: int8 costs the digits teacher at most 2 points of test accuracy (7 of its 359 images)
INT8_MAX_DROP = 0.02


TORCH_WARNING = "<enum 'KernelPreference'> is an Enum subclass ... (what importing torchao logs)"


@pytest.mark.skipif(cpp_compiler() is None, reason="Inductor needs a C++ compiler (g++ or clang++) for the int8 kernels")
def test_int8_digits_teacher_stays_within_the_stated_drop_and_its_program_evaluates_the_same(kd_run, tmp_path, capsys, monkeypatch):
    quantize_int8 = quantize.quantize_int8

    def quantize_with_torch_warnings(*args):  # what torch prints on its own while quantizing (once per process)
        logging.getLogger("torch.utils._pytree").warning(TORCH_WARNING)
        logging.getLogger("torch._inductor").warning("No CUDA runtime is found")
        warnings.warn("a Python warning from torch", UserWarning)
        return quantize_int8(*args)

    monkeypatch.setattr(quantize, "quantize_int8", quantize_with_torch_warnings)
    checkpoint = kd_run / "teacher" / "best.pt"
    assert main(["quantize", str(checkpoint), f"out={tmp_path}", "calls=3", "batch=16", "calibration=256"]) == 0
    result = json.loads((tmp_path / "quantize.json").read_text())
    fp32, int8 = result["models"]
    assert (fp32["role"], int8["role"]) == ("fp32", "int8") and result["calibration_images"] == 256
    assert fp32["test_acc"] > 0.6  # a trained teacher, so the bound means something
    assert abs(result["accuracy_drop"]) <= INT8_MAX_DROP
    assert result["accuracy_drop"] == pytest.approx(fp32["test_acc"] - int8["test_acc"])
    assert int8["size_bytes"] < fp32["size_bytes"] / 2  # one byte per weight instead of four
    assert int8["speed"]["cpu"]["precision"] == "int8" and int8["speed"]["cpu"]["throughput_images_per_s"] > 0
    printed = capsys.readouterr()
    assert "accuracy drop" in printed.out
    # torch's own warnings go to quantize.log, not among the table
    assert "KernelPreference" not in printed.out + printed.err and "CUDA" not in printed.out + printed.err
    assert printed.err == "" and "torch's own warnings:" in printed.out
    log = (tmp_path / "quantize.log").read_text()
    assert TORCH_WARNING in log and "No CUDA runtime is found" in log and "a Python warning from torch" in log

    # the int8 model is written beside the checkpoint, and distill eval measures that file as quantize did
    program = checkpoint.with_suffix(".int8.pt2")
    assert int8["file"] == str(program) and int8["file_bytes"] == program.stat().st_size
    assert json.loads(program.with_name(program.name + ".json").read_text())["max_abs_diff"] <= 1e-5  # the graph itself
    assert main(["eval", str(program), f"out={tmp_path / 'eval'}", "calls=3", "batch=16"]) == 0
    (row,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert (row["role"], row["name"], row["params"]) == ("int8", int8["name"], fp32["params"])
    assert (row["test_acc"], row["ece"], row["confusion"]) == (int8["test_acc"], int8["ece"], int8["confusion"])
    assert row["size_bytes"] == program.stat().st_size and row["macs"] == fp32["macs"]
    assert row["speed"]["cpu"]["precision"] == "int8" and row["speed"]["cpu"]["latency_ms_median"] > 0
    assert "KernelPreference" not in capsys.readouterr().err


def test_the_quantized_graph_holds_int8_weights():
    from distill_cli.ship.quantize import graph_tensors, quantize_int8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    model[1].running_var.fill_(4.0)  # a BatchNorm that prepare_pt2e folds into the convolution's weight
    graph = quantize_int8(model, torch.randn(32, 1, 8, 8), "test model")
    tensors = graph_tensors(graph)
    int8 = sorted(t.numel() for t in tensors.values() if t.dtype == torch.int8)
    assert int8 == [8 * 9, 10 * 8 * 36]  # both weights, the convolution's with the BatchNorm folded in
    assert sum(t.numel() for t in tensors.values() if t.dtype == torch.float32) == 8 + 10 + 8 + 10  # biases, scales


def test_a_model_the_flow_cannot_capture_is_named(tmp_path):
    from distill_cli.ship.quantize import quantize_int8

    with pytest.raises(DistillError, match=r"^branchy cannot be quantized with the PT2E flow"):
        quantize_int8(_Branchy(), torch.randn(8, 1, 8, 8), "branchy")
