"""FitNets' connector as RepDistiller and mdistiller build it (`ConvReg`): the conv chosen by the two hint maps'
sizes, then BatchNorm + ReLU, against the formula computed here with torch's functional convolutions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_kd_config
from test_losses import batch_of
from test_methods_classic import batch_norm_train, randomise
from test_methods_features import outputs_of, set_up

from distill_cli.core.config import DatasetConfig, ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.runs.kd import run_kd

WEIGHT = 3.0


def stride_2_conv(x, conv):
    return F.conv2d(x, conv.weight.double(), stride=2, padding=1)


def stride_2_transposed_conv(x, conv):
    return F.conv_transpose2d(x, conv.weight.double(), stride=2, padding=1)


def valid_conv(x, conv):
    return F.conv2d(x, conv.weight.double())


@pytest.mark.parametrize(
    "student, teacher, kernel, convolve",
    [
        ((3, 8, 8), (5, 4, 4), (3, 3), stride_2_conv),  # twice the teacher's size
        ((3, 4, 6), (5, 8, 12), (4, 4), stride_2_transposed_conv),  # half
        ((3, 6, 7), (5, 4, 4), (3, 4), valid_conv),  # larger otherwise: kernel 1 + sH - tH, 1 + sW - tW
        ((3, 4, 4), (5, 4, 4), (1, 1), valid_conv),  # equal: 1x1
        ((3, 8, 4), (5, 4, 4), (5, 1), valid_conv),  # twice the height only: no stride 2 (the width would halve)
    ],
    ids=["twice", "half", "larger", "equal", "twice-height"],
)
def test_fitnet_connector_conv_is_chosen_by_the_hint_sizes(student, teacher, kernel, convolve):
    """weight * MSE(ReLU(BN(conv(student hint))), teacher hint), the conv's kernel and stride by the sizes."""
    method = set_up({"name": "fitnet", "weight": WEIGHT}, {"stage2": student}, {"stage2": teacher})
    randomise(method, 1)
    conv, batch_norm = method.connector[0], method.connector[1]
    assert tuple(conv.weight.shape[-2:]) == kernel and conv.bias is None
    student_outputs, teacher_outputs = outputs_of({"stage2": student}, seed=2), outputs_of({"stage2": teacher}, seed=3)
    hint = student_outputs.features["stage2"].double()
    connected = batch_norm_train(convolve(hint, conv), batch_norm).clamp(min=0)
    expected = WEIGHT * ((connected - teacher_outputs.features["stage2"].double()) ** 2).mean()
    labels = batch_of(torch.zeros(len(hint), dtype=torch.long))
    value = method(student_outputs, teacher_outputs, labels, 1)["fitnet"]
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "student, teacher",
    [((3, 3, 3), (5, 8, 8)), ((3, 8, 2), (5, 4, 4))],  # smaller but not half; taller but narrower
)
def test_fitnet_refuses_hint_sizes_no_connector_maps_naming_both(student, teacher):
    message = rf"^loss=fitnet: no connector maps the student's stage2 {tuple(student)} to the teacher's {tuple(teacher)} "
    with pytest.raises(DistillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        set_up({"name": "fitnet"}, {"stage2": student}, {"stage2": teacher})


def test_fitnet_refuses_unmappable_hint_sizes_before_anything_trains(tmp_path):
    """6x6 images: the teacher cnn's stage2 is 3x3, MobileNetV2's 2x2 (neither half nor larger)."""
    cfg = small_kd_config(
        tmp_path,
        loss={"name": "fitnet"},
        dataset=DatasetConfig(name="synthetic", num_classes=3, channels=3, image_size=6, train_size=8, test_size=4, val_split=0.0),
        student=ModelConfig("mobilenetv2", {"width_mult": 0.25}),
        batch_size=4,
    )
    with pytest.raises(DistillError, match=r"^loss=fitnet: no connector maps the student's stage2 \(\d+, 2, 2\) to the teacher's \(16, 3, 3\)"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()
