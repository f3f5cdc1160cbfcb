"""The model zoo: published parameter counts, every configs/model YAML on CIFAR- and MNIST-shaped
data, the torchvision adapter, and feature taps by layer name."""

from functools import cache

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli.core.config import ModelConfig, config_dir
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo
from distill_cli.models import build_model, count_parameters
from distill_cli.models.features import FeatureTaps, default_feature_layers
from distill_cli.models.fold import fold_batch_norm


def _info(name: str, classes: int, channels: int, size: int) -> DatasetInfo:
    stats = ((0.5,) * channels, (0.25,) * channels)
    return DatasetInfo(name, classes, channels, (size, size), *stats, class_names=tuple(map(str, range(classes))))


CIFAR = _info("cifar-like", 100, 3, 32)
MNIST = _info("mnist-like", 10, 1, 28)
DIGITS = _info("digits-like", 10, 1, 8)
MODEL_NAMES = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
# one config of each CNN family, its block kinds included (resnet8x4: a projection shortcut in the first
# stage): depth and width only repeat the same layers, so the checks that trace or rebuild a network
# (folding, other input shapes) run on these; test_family_samples_cover_every_cnn_family keeps it whole
FAMILY_SAMPLES = [
    "cnn", "resnet8", "resnet8x4", "resnet50", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2", "torchvision", "timm",
]


@cache
def model_config(name: str) -> ModelConfig:
    node = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
    return ModelConfig(arch=node["arch"], kwargs=node["kwargs"])


def build(name: str, info: DatasetInfo) -> nn.Module:
    return build_model(model_config(name), info, "teacher").eval()


def test_family_samples_cover_every_cnn_family():
    families = {model_config(n).arch for n in MODEL_NAMES} - {"mlp"}
    assert {model_config(n).arch for n in FAMILY_SAMPLES} == families
    assert {n for n in MODEL_NAMES if model_config(n).arch == "resnet_cifar" and model_config(n).kwargs["stem"] != 16} & set(FAMILY_SAMPLES)


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
    "resnet50": 23.71,  # also torchvision's resnet50 at 100 classes with a 3x3 stem for its 7x7: 23,705,252
}


@pytest.mark.parametrize("name, millions", PUBLISHED.items())
def test_parameter_counts_match_the_published_ones(name, millions):
    assert count_parameters(build(name, CIFAR)) / 1e6 == pytest.approx(millions, rel=0.02)


def _first(model: nn.Module, kind: type) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize(
    "name, info",
    [pytest.param(n, info, id=f"{info.name}-{n}") for info, names in ((CIFAR, MODEL_NAMES), (MNIST, [*FAMILY_SAMPLES, "mlp"])) for n in names],
)
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


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_feature_taps_return_named_features_and_leave_no_hooks():
    model = build("resnet8", CIFAR)
    x = torch.randn(2, 3, 32, 32)
    taps = FeatureTaps(model, ["stages.2", "stages.0", "stages.1.0.body"])
    with torch.no_grad():
        logits, features = taps(x)
        expected = model(x)
    torch.testing.assert_close(logits, expected)
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "stages.2": (2, 64, 8, 8),
        "stages.0": (2, 16, 32, 32),
        "stages.1.0.body": (2, 32, 16, 16),
    }
    assert list(features) == ["stages.2", "stages.0", "stages.1.0.body"]
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError):  # a failing forward pass leaves no hooks either
        taps(torch.randn(2, 1, 32, 32))
    assert _hooks(model) == 0


def test_feature_taps_keep_gradients():
    model = build("wrn_16_1", CIFAR).train()
    logits, features = FeatureTaps(model, ["stages.1"])(torch.randn(2, 3, 32, 32))
    features["stages.1"].pow(2).mean().backward()
    assert model.stem.weight.grad is not None and model.head.fc.weight.grad is None


def test_feature_taps_refuse_unknown_layers():
    with pytest.raises(DistillError, match="unknown layer 'stage.1'.*did you mean 'stages.1'"):
        FeatureTaps(build("resnet8", CIFAR), ["stage.1"])


def test_feature_taps_refuse_outputs_overwritten_in_place():
    model = build_model(ModelConfig(arch="torchvision", kwargs={"name": "resnet18"}), CIFAR, "teacher").eval()
    with pytest.raises(DistillError, match="'bn1'.*overwritten in place"):
        FeatureTaps(model, ["bn1"])(torch.randn(2, 3, 32, 32))
    assert _hooks(model) == 0


@pytest.mark.parametrize(
    "name, info, layers",
    [
        ("resnet8", CIFAR, {"stages.0": (16, 32, 32), "stages.1": (32, 16, 16), "stages.2": (64, 8, 8)}),
        ("wrn_40_2", CIFAR, {"stages.0": (32, 32, 32), "stages.1": (64, 16, 16), "stages.2": (128, 8, 8)}),
        (
            "vgg8",
            CIFAR,
            {"stages.0": (128, 16, 16), "stages.1": (256, 8, 8), "stages.2": (512, 4, 4), "stages.3": (512, 4, 4)},
        ),
        (
            "mobilenetv2",
            CIFAR,
            {"stages.0": (12, 16, 16), "stages.1": (16, 8, 8), "stages.2": (48, 4, 4), "stages.3": (160, 2, 2)},
        ),
        ("shufflenetv2", CIFAR, {"stages.0": (116, 16, 16), "stages.1": (232, 8, 8), "stages.2": (464, 4, 4)}),
        # models without a `stages` container: by spatial size (torchvision), by hidden layer (MLPs)
        (
            "torchvision",
            CIFAR,
            {
                "relu": (64, 16, 16),
                "layer1": (64, 8, 8),
                "layer2": (128, 4, 4),
                "layer3": (256, 2, 2),
                "layer4": (512, 1, 1),
            },
        ),
        ("cnn", DIGITS, {"5": (32, 8, 8), "12": (64, 4, 4)}),
        ("hinton_mlp_1200", MNIST, {"3": (1200,), "6": (1200,)}),
        ("hinton_mlp_800", MNIST, {"2": (800,), "4": (800,)}),
    ],
)
def test_default_feature_layers(name, info, layers):
    model = build(name, info).train()
    assert default_feature_layers(model, info) == list(layers)
    assert model.training and _hooks(model) == 0
    _, features = FeatureTaps(model.eval(), layers)(torch.randn(2, info.channels, *info.image_size))
    assert {name: tuple(f.shape[1:]) for name, f in features.items()} == layers


# ---------------------------------------------------------------- BatchNorm folding for frozen teachers


def _trained_statistics(model: nn.Module, info: DatasetInfo) -> nn.Module:
    """`model` in eval mode with BatchNorm running statistics from a few training-mode batches (not 0/1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, info.channels, *info.image_size) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("name", FAMILY_SAMPLES)
def test_folding_batch_norm_keeps_the_outputs(name):
    norms = lambda m: sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())  # noqa: E731
    model = _trained_statistics(build(name, CIFAR), CIFAR)
    before = norms(model)
    folded = fold_batch_norm(model)
    images = torch.randn(4, 3, 32, 32) * 2 + 1
    with torch.no_grad():
        expected, got = model(images), folded(images)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert norms(folded) < before  # every zoo CNN has a conv -> BN pair to fold
    assert norms(model) == before and not model.training  # the model itself is untouched


def test_folding_gives_untraceable_models_unfolded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    model = Branchy()
    copy = fold_batch_norm(model)
    assert isinstance(copy, Branchy) and copy is not model and not copy.training and model.training
