"""`teacher.checkpoint=` reads other tools' files: RepDistiller / mdistiller CIFAR teachers (`{"model": state_dict}`
with their layer names) and plain torchvision state dicts. The reference networks below follow RepDistiller's
models/resnet.py and models/wrn.py (mdistiller's mdistiller/models/cifar/ are the same): their attribute names
make the state dict as those tools write it, and their forward passes say what the loaded teacher must compute."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.core.config import ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo
from distill_cli.models.checkpoints import checked_checkpoint, checked_model

INFO = DatasetInfo("cifar", 10, 3, (32, 32), (0.5,) * 3, (0.5,) * 3, tuple(map(str, range(10))))


def _bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm with statistics other than the defaults, so that a mapping mistake shows in the logits."""
    norm = nn.BatchNorm2d(channels)
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.2, 0.2)
    return norm


class RepBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _bn(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RepResNet(nn.Module):
    """RepDistiller's resnet8x4: num_filters [32, 64, 128, 256], one basic block per layer."""

    def __init__(self, filters=(32, 64, 128, 256), blocks=1, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = _bn(filters[0])
        inplanes = filters[0]
        for index, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2)), start=1):
            layers = [RepBasicBlock(inplanes if b == 0 else planes, planes, stride if b == 0 else 1) for b in range(blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            inplanes = planes
        self.fc = nn.Linear(filters[-1], classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RepWideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1, self.conv1 = _bn(in_planes), nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _bn(out_planes), nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return (x if self.equal else self.convShortcut(activated)) + out


class RepNetworkBlock(nn.Module):
    def __init__(self, blocks, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RepWideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class RepWRN(nn.Module):
    """RepDistiller's wrn_16_2: depth 16 (two blocks a group), widen factor 2, dropRate 0."""

    def __init__(self, blocks=2, k=2, classes=10):
        super().__init__()
        channels = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = RepNetworkBlock(blocks, channels[0], channels[1], 1)
        self.block2 = RepNetworkBlock(blocks, channels[1], channels[2], 2)
        self.block3 = RepNetworkBlock(blocks, channels[2], channels[3], 2)
        self.bn1, self.fc = _bn(channels[3]), nn.Linear(channels[3], classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1))


def _save(tmp_path, state: dict, name: str = "ckpt_epoch_240.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _loaded(path, arch: str, kwargs: dict) -> nn.Module:
    expected = ModelConfig(arch=arch, kwargs=kwargs, name=arch)
    return checked_model(checked_checkpoint(path, expected, "teacher", INFO), expected, "teacher", path, INFO)


@pytest.mark.parametrize(
    "reference,arch,kwargs,wrapped",
    [
        (RepResNet, "resnet_cifar", {"depth": 8, "width": 4, "stem": 32}, "repdistiller"),  # {"model", "epoch", ...}
        (RepResNet, "resnet_cifar", {"depth": 8, "width": 4, "stem": 32}, "dataparallel"),  # module.* names
        (RepWRN, "wrn", {"depth": 16, "widen_factor": 2}, "repdistiller"),
    ],
)
def test_a_peer_teacher_file_computes_what_the_peer_network_computes(tmp_path, reference, arch, kwargs, wrapped):
    torch.manual_seed(0)
    peer = reference().eval()
    state = peer.state_dict()
    if wrapped == "dataparallel":
        state = {f"module.{name}": tensor for name, tensor in state.items()}
    path = _save(tmp_path, {"epoch": 240, "model": state, "accuracy": 79.4})
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(_loaded(path, arch, kwargs)(images), peer(images), atol=1e-5)


def test_a_plain_torchvision_state_dict_loads_as_it_is(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.get_model("squeezenet1_0", weights=None, num_classes=10).eval()
    path = _save(tmp_path, reference.state_dict(), "squeezenet.pth")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_loaded(path, "torchvision", {"name": "squeezenet1_0"})(images), reference(images), atol=1e-5)


def test_a_file_that_does_not_fit_is_refused_naming_the_first_key(tmp_path):
    torch.manual_seed(0)
    state = RepResNet().state_dict()
    odd = _save(tmp_path, {"model": {**state, "layer4.0.conv1.weight": torch.zeros(1)}})
    with pytest.raises(DistillError, match=r"'layer4\.0\.conv1\.weight' is no layer of RepDistiller/mdistiller's resnet_cifar"):
        _loaded(odd, "resnet_cifar", {"depth": 8, "width": 4, "stem": 32})
    resnet20 = _save(tmp_path, {"model": state}, "resnet8x4.pth")  # a resnet8x4 file given for resnet20
    with pytest.raises(DistillError, match=r"does not fit teacher=resnet_cifar: 'stem\.0\.weight' is \(32, 3, 3, 3\), the network's \(16, 3, 3, 3\)$"):
        _loaded(resnet20, "resnet_cifar", {"depth": 20})
    with pytest.raises(DistillError, match=r"RepDistiller/mdistiller files are read for resnet_cifar, wrn \(teacher=vgg is vgg\)"):
        _loaded(resnet20, "vgg", {"depth": 8})
