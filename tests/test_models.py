"""The model zoo: published parameter counts, every configs/model YAML on CIFAR- and MNIST-shaped
data, and the torchvision adapter."""

from functools import cache

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli.config import ModelConfig, config_dir
from distill_cli.data import DatasetInfo
from distill_cli.errors import DistillError
from distill_cli.models import build_model, count_parameters


def _info(name: str, classes: int, channels: int, size: int) -> DatasetInfo:
    stats = ((0.5,) * channels, (0.25,) * channels)
    return DatasetInfo(name, classes, channels, (size, size), *stats, class_names=tuple(map(str, range(classes))))


CIFAR = _info("cifar-like", 100, 3, 32)
MNIST = _info("mnist-like", 10, 1, 28)
DIGITS = _info("digits-like", 10, 1, 8)
MODEL_NAMES = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


@cache
def model_config(name: str) -> ModelConfig:
    node = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
    return ModelConfig(arch=node["arch"], kwargs=node["kwargs"])


def build(name: str, info: DatasetInfo) -> nn.Module:
    return build_model(model_config(name), info, "teacher").eval()


def run(model: nn.Module, info: DatasetInfo) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, info.channels, *info.image_size))


# Parameter counts (100 classes, 3x32x32) from the CRD paper (Tian et al. 2020) and RepDistiller, in millions.
PUBLISHED = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}


@pytest.mark.parametrize("name, millions", PUBLISHED.items())
def test_parameter_counts_match_the_published_ones(name, millions):
    assert count_parameters(build(name, CIFAR)) / 1e6 == pytest.approx(millions, rel=0.02)


def _first(model: nn.Module, kind: type) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("info", [CIFAR, MNIST], ids=lambda info: info.name)
def test_every_model_config_builds_and_runs(name, info):
    model = build(name, info)
    assert run(model, info).shape == (2, info.num_classes)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # the MLPs take the image flattened
        assert _first(model, nn.Conv2d).in_channels == info.channels


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_zoo_cnns_run_on_8x8_digits(name):
    """Global average pooling, not the reference's fixed 8x8 / 4x4 pools, so tiny images work."""
    assert run(build(name, DIGITS), DIGITS).shape == (2, 10)


def test_models_adapt_to_mnist_channels_and_classes():
    model = build("resnet8", MNIST)
    assert model.stem[0].in_channels == 1
    assert model.head.fc.out_features == 10


@pytest.mark.parametrize(
    "name, kwargs",
    [("resnet_cifar", {"depth": 9}), ("wrn", {"depth": 15}), ("vgg", {"depth": 12})],
)
def test_impossible_depths_are_refused(name, kwargs):
    with pytest.raises(DistillError, match="depth"):
        build_model(ModelConfig(arch=name, kwargs=kwargs), CIFAR, "student")


def test_torchvision_models_adapt_to_channels_and_classes():
    model = build_model(ModelConfig(arch="torchvision", kwargs={"name": "resnet18"}), MNIST, "student").eval()
    assert model.conv1.in_channels == 1
    assert model.conv1.out_channels == 64 and model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.out_features == 10
    assert run(model, MNIST).shape == (2, 10)


def test_unknown_torchvision_model_suggests_close_names():
    with pytest.raises(DistillError, match="did you mean 'resnet18'"):
        build_model(ModelConfig(arch="torchvision", kwargs={"name": "resnet81"}), CIFAR, "teacher")
