"""Compression around distillation: `distill prune` (channels, weights), healing a pruned network with
`student.checkpoint=`, and teacher-initialised students (`student.init=teacher`)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import metrics_without_timing, run_distill_in_process, small_kd_config, small_train_config
from torch import nn

from distill_cli.cli.main import main
from distill_cli.core.checkpoint import load_checkpoint, model_checkpoint, save_atomic
from distill_cli.core.config import BenchConfig, DatasetConfig, ModelConfig, StudentConfig, TeacherConfig, to_plain
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo, load_dataset
from distill_cli.kd.wiring import build_student
from distill_cli.models import build_model
from distill_cli.models.checkpoints import model_from_checkpoint, recorded_layers
from distill_cli.models.pruning import copy_teacher, prune_channels, prune_weights, sparsity
from distill_cli.runs.bench import run_bench
from distill_cli.runs.fused import run_kd_fused
from distill_cli.runs.kd import run_kd
from distill_cli.training.compute import Compute

DIGITS = DatasetInfo("digits", 10, 1, (8, 8), (0.5,), (0.5,), tuple(str(i) for i in range(10)))
CPU = Compute(torch.device("cpu"), "fp32")
QUICK = ["calls=2", "batch=8"]


def network(arch: str, **kwargs) -> nn.Module:
    return build_model(ModelConfig(arch=arch, kwargs=kwargs), DIGITS, "model").eval()


def digits_checkpoint(path: Path, model: nn.Module, arch: str, tmp_path: Path, **kwargs) -> Path:
    """`model` saved as a `distill train` run on digits would save it (its config rebuilds the data)."""
    config = to_plain(small_train_config(tmp_path))
    save_atomic(model_checkpoint(model, arch, kwargs, 10, dataset="digits", config=config), path)
    return path


# ---------------------------------------------------------------- pruning


def test_channel_pruning_removes_the_lowest_l1_channels_of_every_layer():
    """Half the channels of each conv carry nothing (weights and BN zero): l1 pruning at 0.5 must remove
    exactly those, leaving the width-4 network's parameter count and the very same outputs."""
    torch.manual_seed(0)
    model = network("cnn", width=8)
    dead = {0: [1, 2, 5, 6], 3: [0, 3, 4, 7], 7: [2, 3, 8, 9, 10, 11, 12, 15], 10: list(range(0, 16, 2))}
    with torch.no_grad():
        for index, channels in dead.items():
            model[index].weight[channels] = 0
            model[index + 1].weight[channels] = 0
            model[index + 1].bias[channels] = 0
    images = torch.randn(4, 1, 8, 8)
    expected = model(images)
    prune_channels(model, 0.5, "l1", images[:1])
    assert [model[i].out_channels for i in dead] == [4, 4, 8, 8]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in network("cnn", width=4).parameters())
    torch.testing.assert_close(model(images), expected)


def test_weight_pruning_zeroes_the_smallest_magnitudes_of_each_layer_and_is_permanent():
    torch.manual_seed(0)
    model = network("mlp", hidden=[32])
    before = [layer.weight.detach().clone() for layer in (model[1], model[3])]
    prune_weights(model, 0.75)
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name, _ in model.named_parameters())
    for weights, layer in zip(before, (model[1], model[3])):
        threshold = weights.abs().flatten().kthvalue(int(0.75 * weights.numel())).values  # by hand
        torch.testing.assert_close(layer.weight, torch.where(weights.abs() > threshold, weights, torch.zeros_like(weights)))
    assert sparsity(model) == pytest.approx(0.75, abs=1e-3)


def test_a_pruned_residual_network_rebuilds_from_its_checkpoint_with_weights_only_loading(tmp_path):
    torch.manual_seed(0)
    model = network("resnet_cifar", depth=8)
    prune_channels(model, 0.5, "l2", torch.randn(1, 1, 8, 8))
    layers = recorded_layers(model, ModelConfig(arch="resnet_cifar", kwargs={"depth": 8}), DIGITS)
    assert layers["stages.0.0.body.0.0"] == {"in_channels": 8, "out_channels": 8, "groups": 1}
    path = tmp_path / "pruned.pt"
    save_atomic(model_checkpoint(model, "resnet_cifar", {"depth": 8}, 10, dataset="digits", layers=layers), path)
    torch.load(path, weights_only=True)  # nothing pickled but numbers and tensors
    rebuilt, name = model_from_checkpoint(path, DIGITS)
    images = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(images), model(images))
    assert name.endswith("pruned")


@pytest.mark.parametrize(
    "options, model, message",
    [
        (["amount=1"], ("cnn", {"width": 8}), "amount=1.0: the share of channels or weights to remove must be in [0, 1)"),
        (["amount=-0.1"], ("cnn", {"width": 8}), "must be in [0, 1)"),
        (["structure=weights", "importance=taylor"], ("cnn", {"width": 8}), "structure=weights removes single weights by magnitude"),
        (["amount=0.5"], ("mlp", {"hidden": []}), "nothing to prune: the network has no channels outside its classifier"),
    ],
)
def test_bad_prune_input_is_one_line_and_writes_nothing(options, model, message, tmp_path, capsys):
    arch, kwargs = model
    source = digits_checkpoint(tmp_path / "best.pt", network(arch, **kwargs), arch, tmp_path, **kwargs)
    assert main(["prune", str(source), *options, *QUICK]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "best.pruned.pt").exists()


def test_a_checkpoint_whose_pruned_layers_do_not_fit_its_architecture_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    save_atomic(model_checkpoint(network("cnn", width=8), "cnn", {"width": 8}, 10, dataset="digits", layers={"42": {"out_channels": 3}}), path)
    with pytest.raises(DistillError, match="pruned layer '42' is not in the architecture it names; it cannot be rebuilt"):
        model_from_checkpoint(path, DIGITS)


# ---------------------------------------------------------------- healing


def test_a_weight_pruned_student_keeps_its_zeros_while_it_trains(tmp_path):
    """The student of `student.checkpoint=` starts from the file's weights, and SGD with momentum and weight
    decay moves every weight but the pruned ones."""
    torch.manual_seed(0)
    source = network("cnn", width=4)
    prune_weights(source, 0.6)
    path = digits_checkpoint(tmp_path / "sparse.pt", source, "cnn", tmp_path, width=4)
    data = load_dataset(small_train_config(tmp_path).dataset)
    student = build_student(StudentConfig(arch="cnn", kwargs={"width": 4}, checkpoint=str(path)), data, CPU).train()
    for key, tensor in source.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], tensor)
    zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() > 1}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(student(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
    for name, p in student.named_parameters():
        if p.dim() > 1:
            assert (p[zeros[name]] == 0).all() and (p[~zeros[name]] != dict(source.named_parameters())[name][~zeros[name]]).any()


@pytest.mark.slow
def test_prune_writes_a_checkpoint_that_eval_export_and_kd_read_back_and_kd_heals_it(tmp_path):
    """`distill prune`, then `distill eval` and `distill export` of the pruned file with no further arguments,
    then `distill kd student.checkpoint=<pruned> teacher.checkpoint=<original>` fine-tunes it."""
    torch.manual_seed(0)
    teacher = digits_checkpoint(tmp_path / "best.pt", network("cnn", width=8), "cnn", tmp_path, width=8)
    assert main(["prune", str(teacher), "amount=0.5", *QUICK]) == 0
    pruned = tmp_path / "best.pruned.pt"
    result = json.loads((tmp_path / "eval" / "prune.json").read_text())
    before, after = result["models"]
    assert after["params"] < before["params"] / 2 and after["macs"] < before["macs"] / 2
    assert {"test_acc", "size_bytes", "macs", "speed"} <= set(after) and result["checkpoint"] == str(pruned)
    assert main(["eval", str(pruned), f"out={tmp_path / 'e'}", "gpu=false", *QUICK]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["models"][0]["params"] == after["params"]
    assert main(["export", str(pruned), "format=pt2"]) == 0 and pruned.with_suffix(".pt2").is_file()

    run_distill_in_process(
        "kd", f"student.checkpoint={pruned}", f"teacher.checkpoint={teacher}", "teacher.kwargs.width=8", "epochs=1",
        "device=cpu", f"teacher_cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    start, healed = load_checkpoint(pruned), load_checkpoint(tmp_path / "run" / "best.pt")
    assert summary["student"]["params"] == after["params"] and healed["layers"] == start["layers"] and "baseline" not in summary
    assert any(not torch.equal(healed["state_dict"][k], start["state_dict"][k]) for k in start["state_dict"])  # it trained
    model, _ = model_from_checkpoint(tmp_path / "run" / "best.pt", DIGITS)
    assert model[0].out_channels == 4


def test_a_checkpoint_of_other_data_is_refused_before_training(tmp_path):
    """A channel-pruned digits (1-channel) file, its first layer rebuilt from the file, as the student of a
    3-channel run: one line naming the file and the data, not a convolution's error at the first step."""
    model = network("cnn", width=8)
    prune_channels(model, 0.5, "l1", torch.randn(1, 1, 8, 8))
    layers = recorded_layers(model, ModelConfig(arch="cnn", kwargs={"width": 8}), DIGITS)
    path = tmp_path / "digits.pt"
    save_atomic(model_checkpoint(model, "cnn", {"width": 8}, 10, dataset="digits", layers=layers), path)
    data = load_dataset(DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=32, train_size=64, test_size=16))
    refusal = rf"student.checkpoint {path} does not take synthetic's 3x32x32 images \(.*\); was it trained on other data\?"
    with pytest.raises(DistillError, match=refusal):
        build_student(StudentConfig(arch="cnn", kwargs={"width": 8}, checkpoint=str(path)), data, CPU)


def _sparse_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = network("cnn", width=4)
    prune_weights(model, 0.5)
    return digits_checkpoint(tmp_path / "sparse.pt", model, "cnn", tmp_path, width=4)


STARTS = {  # the two ways a student starts trained, as `distill kd student.* ...` writes them (mlp: the default student)
    "checkpoint": lambda tmp_path: StudentConfig(arch="mlp", kwargs={"hidden": [4]}, checkpoint=str(_sparse_file(tmp_path))),
    "teacher": lambda tmp_path: StudentConfig(arch="cnn", kwargs={"width": 4}, init="teacher"),
}


@pytest.mark.slow
@pytest.mark.parametrize("start", STARTS)
def test_students_that_start_trained_train_in_fused_sweeps_and_are_timed_by_bench(start, tmp_path, quiet_results):
    """`student.checkpoint=` (its architecture read from the file) and `student.init=teacher` in a fused
    alpha sweep and in `distill bench fused=2`. alpha=0 reads no teacher, yet its student starts as the run
    alone starts it (for `init=teacher`: copied from the teacher, whom the group's memory probe must not need)."""
    teacher = digits_checkpoint(tmp_path / "teacher.pt", network("cnn", width=8), "cnn", tmp_path, width=8)
    base = small_kd_config(
        tmp_path, teacher=TeacherConfig(arch="cnn", kwargs={"width": 8}, checkpoint=str(teacher)), student=STARTS[start](tmp_path),
        dataset=DatasetConfig(name="synthetic", num_classes=10, channels=1, image_size=8, train_size=128, test_size=32),  # digits' shape
        epochs=1,
    )
    summaries = run_kd_fused([replace(base, alpha=0.0), replace(base, alpha=0.9)], [tmp_path / "0", tmp_path / "1"])
    assert [s["status"] for s in summaries] == ["completed"] * 2
    assert {s["student"]["arch"] for s in summaries} == {"cnn"} and "baseline" not in summaries[0]
    run_kd(replace(base, alpha=0.0), tmp_path / "alone")
    assert metrics_without_timing(tmp_path / "0") == metrics_without_timing(tmp_path / "alone")
    bench = BenchConfig(**{**vars(base), "fused": 2, "warmup_steps": 1, "steps": 2, "repeats": 1})
    assert all(row["images_per_s"] > 0 for row in run_bench(bench, tmp_path / "bench")["results"].values())


# ---------------------------------------------------------------- teacher-initialised students


def test_a_narrower_student_gets_the_teachers_highest_l1_units():
    torch.manual_seed(0)
    teacher, student = network("mlp", hidden=[6]), network("mlp", hidden=[3])
    strong = [1, 4, 5]
    with torch.no_grad():
        teacher[1].weight[strong] *= 10
        teacher[3].weight[:, strong] *= 10
    copy_teacher(student, teacher, torch.zeros(1, 1, 8, 8), "pair")
    torch.testing.assert_close(student[1].weight, teacher[1].weight[strong])
    torch.testing.assert_close(student[1].bias, teacher[1].bias[strong])
    torch.testing.assert_close(student[3].weight, teacher[3].weight[:, strong])
    torch.testing.assert_close(student[3].bias, teacher[3].bias)


def test_a_narrower_student_starts_as_the_teacher_pruned_to_its_width():
    """The same importance as `distill prune`: cnn width 8 -> 4 copies exactly what l1 pruning at 0.5 keeps."""
    torch.manual_seed(0)
    teacher, student = network("cnn", width=8), network("cnn", width=4)
    copy_teacher(student, teacher, torch.zeros(1, 1, 8, 8), "pair")
    prune_channels(teacher, 0.5, "l1", torch.zeros(1, 1, 8, 8))
    for key, tensor in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], tensor)


def test_a_shallower_student_gets_every_kth_block_of_each_stage():
    torch.manual_seed(0)
    teacher, student = network("resnet_cifar", depth=26), network("resnet_cifar", depth=14)  # 4 -> 2 blocks per stage
    copy_teacher(student, teacher, torch.zeros(1, 1, 8, 8), "pair")
    for stage in range(3):
        for mine, theirs in ((0, 0), (1, 2)):
            for a, b in zip(student.stages[stage][mine].state_dict().values(), teacher.stages[stage][theirs].state_dict().values()):
                torch.testing.assert_close(a, b)
    torch.testing.assert_close(student.head.fc.weight, teacher.head.fc.weight)


@pytest.mark.parametrize(
    "teacher, student, message",
    [
        (("cnn", {"width": 8}), ("mlp", {"hidden": [8]}), "the weights copy within one family; it needs a shallower or narrower cnn student"),
        (("cnn", {"width": 4}), ("cnn", {"width": 8}), "the student's layer 10 has 16 channels, the teacher's 8; it needs a narrower student"),
        (("resnet_cifar", {"depth": 8}), ("resnet_cifar", {"depth": 14}), "has more blocks (2) than the teacher's (1); it needs a shallower student"),
    ],
)
def test_student_init_teacher_refuses_other_pairs_in_one_line(teacher, student, message, tmp_path):
    data = load_dataset(small_train_config(tmp_path).dataset)
    teacher_cfg = ModelConfig(arch=teacher[0], kwargs=teacher[1])
    with pytest.raises(DistillError, match=re.escape(message)):
        build_student(StudentConfig(arch=student[0], kwargs=student[1], init="teacher"), data, CPU, teacher=(teacher_cfg, network(*teacher[:1], **teacher[1])))
