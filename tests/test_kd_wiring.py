"""How `distill kd` wires a method: teacher features of the BN-folded teacher, checks before any
training, and the teacher checkpoint's arguments."""


import pytest
import torch
from conftest import small_kd_config, small_train_config

from distill_cli.core.config import ModelConfig, TeacherConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo
from distill_cli.models import build_model
from distill_cli.models.features import PREACT, FeatureTaps, feature_points
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.compute import Compute

CIFAR = DatasetInfo("cifar", 10, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, tuple(map(str, range(10))))
CPU = Compute(torch.device("cpu"), "fp32", channels_last=None)


@pytest.mark.parametrize("name", ["resnet_cifar", "wrn", "vgg", "mobilenetv2", "shufflenetv1", "cnn"])
def test_frozen_teacher_features_come_from_the_folded_graph_and_match_the_model(name):
    model = build_model(ModelConfig(arch=name), CIFAR, "teacher")
    model.train()
    model(torch.randn(8, 3, 32, 32))  # running statistics that are not 0 / 1
    model.eval()
    points = tuple(p for p in feature_points(model, CIFAR) if p != "logits")
    assert "pooled" in points and "stage1" in points
    ran = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda *args: ran.append(1))
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    frozen = CPU.frozen_forward(model, points=points, info=CIFAR)
    ran.clear()  # finding a cnn's stages runs the model once
    outputs = frozen(images)
    folded_calls, ran[:] = len(ran), []
    model(images)
    # BatchNorm folded into the convolution before it (pre-activation WRN blocks keep those with none)
    assert folded_calls < len(ran) and (folded_calls == 0 or name == "wrn")
    # module outputs, checked by hooks; the pre-ReLU points (a sum, an output a ReLU overwrites in place)
    # are no module's output and are checked against their stage in test_methods_classic.py
    layers = {p: n for p, n in feature_points(model, CIFAR).items() if p in points and p != "pooled" and not p.startswith(PREACT)}
    with torch.no_grad():
        logits, expected = FeatureTaps(model, layers.values())(images)
    assert torch.allclose(outputs.logits, logits, atol=1e-4)
    for point, layer in layers.items():
        assert torch.allclose(outputs.features[point], expected[layer], atol=1e-4), point
    for point in (p for p in points if p.startswith(PREACT) and name != "wrn"):  # WRN's: the next BN's output
        stage = outputs.features[point.replace(PREACT, "stage")]
        assert (outputs.features[point] < 0).any() and torch.allclose(outputs.features[point].clamp(min=0), stage, atol=1e-4), point
    assert outputs.features["pooled"].shape == (4, model.get_submodule(_classifier(model)).in_features)
    for value in (outputs.logits, *outputs.features.values()):
        assert not value.is_inference() and not value.requires_grad  # usable by a loss's backward pass


def _classifier(model) -> str:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-1]


def test_student_features_share_the_students_parameters():
    model = build_model(ModelConfig(arch="resnet_cifar", kwargs={"depth": 8}), CIFAR, "student")
    forward = CPU.outputs(model, CIFAR, ("stage2", "pooled"))
    outputs = forward(torch.randn(2, 3, 32, 32))
    outputs.features["stage2"].mean().backward()
    assert model.stages[1][0].body[0][0].weight.grad is not None  # gradients reach the student itself
    assert model.head.fc.weight.grad is None  # the stage-2 feature does not depend on the classifier


def test_feature_taps_keep_guarding_in_place_overwrites_under_inference_mode():
    """Under inference mode torch keeps no version counters: the taps keep a copy instead, so the value
    returned is the tapped layer's output, not what a later in-place op made of it."""
    model = build_model(ModelConfig(arch="torchvision", kwargs={"name": "resnet18"}), CIFAR, "teacher").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        _, features = FeatureTaps(model, ["bn1"])(images)
        expected = model.bn1(model.conv1(images))
    assert torch.equal(features["bn1"], expected)  # before the in-place ReLU that follows it


def test_a_bad_student_argument_fails_before_the_teacher_trains(tmp_path):
    """`distill kd teacher_epochs=5 +student.kwargs.nosuch=1` must not train a teacher and a baseline first."""
    cfg = small_kd_config(tmp_path, student=ModelConfig("mlp", {"hidden": [4], "nosuch": 1}))
    with pytest.raises(DistillError, match="student.kwargs.nosuch: not an argument"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "student, message",
    [
        (ModelConfig("mlp", {"hidden": [0]}), r"student.kwargs hidden=\[0\]: make no usable mlp network"),
        (ModelConfig("cnn", {"width": 0}), "student.kwargs width=0: make no usable cnn network"),
        (ModelConfig("cnn", {"width": -2}), "student.kwargs width=-2: make no cnn network"),
    ],
)
def test_sizes_that_make_no_network_are_refused_naming_the_key(tmp_path, student, message):
    with pytest.raises(DistillError, match=message):
        run_kd(small_kd_config(tmp_path, student=student), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_feature_method_with_a_student_without_feature_maps_fails_before_training(tmp_path):
    cfg = small_kd_config(tmp_path, loss={"name": "fitnet"})
    with pytest.raises(DistillError, match=r"^loss=fitnet: student=mlp has no feature point 'stage2' \(it has: pooled\)"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_teacher_checkpoint_with_other_arguments_than_teacher_is_refused(tmp_path):
    run_train(small_train_config(tmp_path), tmp_path / "teacher")
    path = str(tmp_path / "teacher" / "best.pt")
    other = TeacherConfig(arch="cnn", kwargs={"width": 16, "blocks": 2}, checkpoint=path)
    with pytest.raises(DistillError, match=r"holds cnn\(blocks=2, width=8\) but teacher= is cnn\(blocks=2, width=16\)"):
        run_kd(small_kd_config(tmp_path, teacher=other), tmp_path / "kd")
    assert not (tmp_path / "kd" / "baseline").exists()


def test_baseline_progress_lines_say_baseline(tmp_path, caplog, quiet_results):
    caplog.set_level("INFO", logger="distill")
    run_kd(small_kd_config(tmp_path, epochs=1, teacher_epochs=1), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if " epoch 1/1 " in r.getMessage()]
    assert [line.split()[0] for line in lines] == ["teacher", "baseline", "student"]
