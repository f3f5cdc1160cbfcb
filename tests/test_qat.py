"""`distill quantize qat=true`: quantization-aware training with the fp32 model as teacher (runs/qat.py)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import small_train_config

import distill_cli.ship.programs as programs
import distill_cli.ship.quantize as quantize
from distill_cli.cli.main import main
from distill_cli.core.checkpoint import BEST
from distill_cli.models.checkpoints import model_from_checkpoint
from distill_cli.runs.qat import fine_tune_with_teacher
from distill_cli.runs.train import run_train
from distill_cli.ship.evaluate import first_images, predict
from distill_cli.ship.programs import cpp_compiler
from distill_cli.ship.quantize import FineTuning, convert_qat, graph_tensors, prepare_qat, quantize_int8
from distill_cli.training.setup import prepare_run

QAT = {"epochs": 1, "T": 4.0, "alpha": 0.9, "lr_scale": 0.01}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    """A digits cnn trained for two epochs."""
    root = tmp_path_factory.mktemp("qat")
    run_train(small_train_config(root, epochs=2), root / "run")
    return root / "run" / BEST


def _accuracy(graph, loader) -> float:
    logits, labels = predict(graph, loader)
    return (logits.argmax(1) == labels).float().mean().item()


def test_qat_fine_tune_trains_the_fake_quantized_network_differs_from_post_training_and_resumes(digits_teacher, tmp_path):
    cfg = small_train_config(tmp_path, batch_size=256)  # 5 steps an epoch
    compute, data, loaders = prepare_run(cfg)
    model, name = model_from_checkpoint(digits_teacher, data.info)
    calibration = first_images(loaders.eval_loader(data.train), 256)
    post_training = quantize_int8(model, calibration, name)

    def fine_tuned():
        network = prepare_qat(model, calibration, name)
        before = {key: value.clone() for key, value in network.state_dict().items()}
        fine_tune_with_teacher(FineTuning(network, model, digits_teacher, cfg, compute, data, loaders, tmp_path / "qat"), QAT)
        return network, before

    network, before = fine_tuned()
    after = network.state_dict()
    weights = [key for key, value in after.items() if value.is_floating_point() and value.dim() > 1]
    assert weights and all(not torch.equal(before[key], after[key]) for key in weights)  # every weight was trained
    scales = [key for key in after if key.endswith(".scale") and "activation_post_process" in key]
    assert scales and all(not torch.equal(before[key], after[key]) for key in scales)  # the observers learnt ranges
    quantization_aware = convert_qat(network, name)
    int8 = [sorted((t for t in graph_tensors(graph).values() if t.dtype == torch.int8), key=len) for graph in (post_training, quantization_aware)]
    assert len(int8[0]) == len(int8[1]) and all(not torch.equal(a, b) for a, b in zip(*int8))  # other int8 weights than PTQ's
    qat_accuracy, ptq_accuracy = _accuracy(quantization_aware, loaders.test), _accuracy(post_training, loaders.test)
    assert qat_accuracy >= ptq_accuracy - 0.01, (qat_accuracy, ptq_accuracy)  # no worse than post-training (3.6 images)

    # the same recipe again resumes from qat/last.pt: nothing trains, the network is the one fine-tuned above
    lines = (tmp_path / "qat" / "metrics.jsonl").read_text()
    resumed, _ = fine_tuned()
    assert [key for key, value in resumed.state_dict().items() if not torch.equal(value, after[key])] == []
    assert (tmp_path / "qat" / "metrics.jsonl").read_text() == lines
    assert sorted(path.name for path in (tmp_path / "qat").iterdir()) == ["last.pt", "metrics.jsonl"]  # no best.pt, no temporary file


@pytest.mark.parametrize(
    "args, message",
    [
        (["qat=true", "epochs=0"], "qat=true needs epochs=N with N >= 1"),
        (["epochs=2"], "epochs=2 is the length of a quantization-aware fine-tune: add qat=true"),
        (["qat=true", "epochs=1", "alpha=1.5"], "alpha: must be in [0, 1]"),
        (["qat=true", "epochs=1", "T=0"], "T: must be a finite number > 0"),
    ],
    ids=["no epochs", "epochs without qat", "alpha", "T"],
)
def test_bad_qat_options_are_one_line_before_training(digits_teacher, tmp_path, capsys, args, message):
    assert main(["quantize", str(digits_teacher), f"out={tmp_path}", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"distill quantize: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_qat_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert main(["quantize", str(tmp_path / "notes.pt"), "qat=true", "epochs=1", f"out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"distill quantize: error: {tmp_path / 'notes.pt'} is not a checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_qat_without_a_compiler_is_one_line_before_training(digits_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    assert main(["quantize", str(digits_teacher), "qat=true", "epochs=1", f"out={tmp_path / 'out'}"]) == 1
    assert "needs a C++ compiler" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(cpp_compiler() is None, reason="Inductor needs a C++ compiler (g++ or clang++) for the int8 kernels")
def test_qat_through_the_cli_writes_an_int8_program_that_eval_reads_back(digits_teacher, tmp_path, capsys, monkeypatch):
    # the int8 graphs run eagerly: Inductor's int8 kernels cost minutes to compile on a loaded 2-core machine
    # (test_ship's post-training test runs them), and eager runs compute the same classes
    for module in (programs, quantize):
        monkeypatch.setattr(module, "compiled", lambda graph: lambda images: graph(images.contiguous()))
    args = ["quantize", str(digits_teacher), "qat=true", "epochs=1", f"out={tmp_path}", "calls=3", "batch=16", "calibration=64", "batch_size=256"]
    assert main(args) == 0
    result = json.loads((tmp_path / "quantize.json").read_text())
    fp32, ptq, qat = result["models"]
    assert (fp32["role"], ptq["role"], qat["role"]) == ("fp32", "int8", "int8 QAT")
    assert result["qat"]["accuracy_drop"] == pytest.approx(fp32["test_acc"] - qat["test_acc"])
    assert (result["qat"]["epochs"], result["qat"]["lr"]) == (1, pytest.approx(0.01 * small_train_config(tmp_path).optimizer.lr))
    assert "int8 QAT program" in capsys.readouterr().out
    program = digits_teacher.with_suffix(".qat.int8.pt2")
    assert qat["file"] == str(program) and ptq["file"] == str(digits_teacher.with_suffix(".int8.pt2"))

    assert main(["eval", str(program), f"out={tmp_path / 'eval'}", "calls=3", "batch=16"]) == 0
    (row,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert (row["role"], row["test_acc"], row["confusion"]) == ("int8", qat["test_acc"], qat["confusion"])
    assert row["speed"]["cpu"]["latency_ms_median"] > 0
