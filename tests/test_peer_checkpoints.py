"""`teacher.checkpoint=` reads other tools' files: RepDistiller / mdistiller CIFAR teachers (`{"model": state_dict}`
with their layer names) and plain torchvision state dicts. The reference networks below follow RepDistiller's
models/resnet.py, resnetv2.py (ResNet50), wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py and ShuffleNetv2.py (mdistiller's
mdistiller/models/cifar/ are the same): their attribute names make the state dict as those tools write it,
and their forward passes say what the loaded teacher must compute."""

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


class RepBottleneck(nn.Module):
    """RepDistiller's models/resnetv2.py Bottleneck: 1x1, 3x3 (the stride), 1x1 to 4x, `shortcut` conv + BN."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 1, bias=False), _bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), _bn(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False), _bn(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RepResNetV2(nn.Module):
    """RepDistiller's ResNet of models/resnetv2.py (ResNet50 with blocks 3-4-6-3): a 3x3 64-channel stem, `layer1-4`
    of 64-128-256-512 x 4 channels, `linear`."""

    def __init__(self, blocks=(1, 1, 1, 1), classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), _bn(64)
        in_planes = 64
        for index, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
            layers = [RepBottleneck(in_planes if b == 0 else 4 * planes, planes, stride if b == 0 else 1) for b in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_planes = 4 * planes
        self.linear = nn.Linear(2048, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


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


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1, bias=False) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=bias), _bn(out_channels), nn.ReLU()]


class RepVGG(nn.Module):
    """RepDistiller's vgg11_bn (cfg 'A'): `block<g>` = (conv, BN, ReLU) per conv, the last ReLU dropped; pools
    0-2 between the groups (pool3 only for 64 px images), global average pooling, `classifier`."""

    def __init__(self, groups=((64,), (128,), (256, 256), (512, 512), (512, 512)), classes=10):
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(groups):
            layers = []
            for width in widths:
                layers += _conv_bn_relu(in_channels, width, bias=True)
                in_channels = width
            setattr(self, f"block{index}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(in_channels, classes)

    def forward(self, x):
        x = F.relu(self.block0(x))
        for index in (1, 2, 3):
            x = F.relu(getattr(self, f"block{index}")(F.max_pool2d(x, 2)))
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RepInvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand):
        super().__init__()
        hidden = inp * expand
        layers = _conv_bn_relu(inp, hidden, 1) + _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden) + _conv_bn_relu(hidden, oup, 1)
        self.conv = nn.Sequential(*layers[:-1])
        self.residual = stride == 1 and inp == oup

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class RepMobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 (mobile_half: width 0.5; expansion T): `conv1`, 7 `blocks` groups, `conv2`
    (1x1 to 1280), `classifier.0`."""

    def __init__(self, T=6, width=0.5, classes=10):
        super().__init__()
        settings = [(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2), (T, 320, 1, 1)]
        channels = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, channels, 3, 2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out = int(c * width)
            self.blocks.append(nn.Sequential(*[RepInvertedResidual(channels if i == 0 else out, out, s if i == 0 else 1, t) for i in range(n)]))
            channels = out
        self.conv2 = nn.Sequential(*_conv_bn_relu(channels, 1280, 1))
        self.classifier = nn.Sequential(nn.Linear(1280, classes))

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


def _shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class RepShuffleV1Unit(nn.Module):
    """RepDistiller's ShuffleNetv1 Bottleneck: conv1/bn1 (groups 1 after the 24-channel stem), shuffle,
    conv2/bn2 depthwise, conv3/bn3; a stride-2 unit concatenates the 3x3 average-pooled input."""

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid, self.g, self.stride = out_planes // 4, 1 if in_planes == 24 else groups, stride
        self.conv1, self.bn1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False), _bn(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False), _bn(out_planes)

    def forward(self, x):
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x)


class RepShuffleV1(nn.Module):
    def __init__(self, out_planes=(48, 96, 192), blocks=(2, 2, 2), groups=3, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), _bn(24)
        in_planes = 24
        for index, (out, count) in enumerate(zip(out_planes, blocks), start=1):
            units = [RepShuffleV1Unit(in_planes if i == 0 else out, out - (in_planes if i == 0 else 0), 2 if i == 0 else 1, groups) for i in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_planes = out
        self.linear = nn.Linear(in_planes, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RepShuffleV2Basic(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(half, half, 1, bias=False), _bn(half)
        self.conv2, self.bn2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), _bn(half)
        self.conv3, self.bn3 = nn.Conv2d(half, half, 1, bias=False), _bn(half)

    def forward(self, x):
        kept, out = x.chunk(2, dim=1)
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(out))))))))
        return _shuffle(torch.cat([kept, out], 1), 2)


class RepShuffleV2Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1, self.bn1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False), _bn(in_channels)
        self.conv2, self.bn2 = nn.Conv2d(in_channels, mid, 1, bias=False), _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(in_channels, mid, 1, bias=False), _bn(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), _bn(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), _bn(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return _shuffle(torch.cat([left, right], 1), 2)


class RepShuffleV2(nn.Module):
    """RepDistiller's ShuffleNetV2: `layer<L>` = a DownBlock then BasicBlocks, `conv2`/`bn2`, `linear`."""

    def __init__(self, out_channels=(48, 96, 192, 256), blocks=(1, 2, 1), classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), _bn(24)
        in_channels = 24
        for index, (out, count) in enumerate(zip(out_channels, blocks), start=1):
            setattr(self, f"layer{index}", nn.Sequential(RepShuffleV2Down(in_channels, out), *(RepShuffleV2Basic(out) for _ in range(count))))
            in_channels = out
        self.conv2, self.bn2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False), _bn(out_channels[3])
        self.linear = nn.Linear(out_channels[3], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 1).flatten(1))


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
        (lambda: RepResNetV2(blocks=(1, 2, 1, 1)), "resnet_bottleneck", {"blocks": [1, 2, 1, 1], "stem": 64}, "repdistiller"),
        (RepWRN, "wrn", {"depth": 16, "widen_factor": 2}, "repdistiller"),
        (RepVGG, "vgg", {"depth": 11}, "repdistiller"),
        (lambda: RepMobileNetV2(T=2), "mobilenetv2", {"expansion": 2}, "repdistiller"),
        (RepShuffleV1, "shufflenetv1", {"out_channels": [48, 96, 192], "blocks": [2, 2, 2]}, "repdistiller"),
        (RepShuffleV2, "shufflenetv2", {"out_channels": [48, 96, 192, 256], "blocks": [1, 2, 1]}, "repdistiller"),
    ],
    ids=["resnet8x4", "resnet8x4-dataparallel", "resnet50-like", "wrn_16_2", "vgg11", "mobilenetv2", "shufflenetv1", "shufflenetv2"],
)
def test_a_peer_teacher_file_computes_what_the_peer_network_computes(tmp_path, reference, arch, kwargs, wrapped):
    torch.manual_seed(0)
    peer = reference().eval()
    state = peer.state_dict()
    if wrapped == "dataparallel":
        state = {f"module.{name}": tensor for name, tensor in state.items()}
    path = _save(tmp_path, {"epoch": 240, "model": state, "accuracy": 79.4})
    images = torch.randn(2, 3, 32, 32)
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
    with pytest.raises(DistillError, match=r"RepDistiller/mdistiller files are read for resnet_cifar, resnet_bottleneck, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2 \(teacher=cnn is cnn\)"):
        _loaded(resnet20, "cnn", {"width": 4})


@pytest.mark.parametrize(
    "reference, arch, kwargs, first",
    [
        (RepResNet, "vgg", {"depth": 8}, r"'conv1\.weight' is no layer of RepDistiller/mdistiller's vgg; is it a vgg\?"),
        (RepVGG, "vgg", {"depth": 8}, r"does not fit teacher=vgg: .*'stages\.1\.2\.0\.weight' is no tensor of the network$"),
        (RepShuffleV2, "shufflenetv1", {}, r"'layer1\.0\.conv4\.weight' is no layer of RepDistiller/mdistiller's shufflenetv1"),
        (RepVGG, "mobilenetv2", {}, r"'block0\.0\.weight' is no layer of RepDistiller/mdistiller's mobilenetv2"),
    ],
    ids=["resnet-as-vgg", "vgg11-as-vgg8", "v2-as-v1", "vgg-as-mobilenetv2"],
)
def test_a_peer_file_of_another_network_is_refused_naming_the_first_key_that_does_not_fit(tmp_path, reference, arch, kwargs, first):
    torch.manual_seed(0)
    path = _save(tmp_path, {"model": reference().state_dict()})
    with pytest.raises(DistillError, match=first):
        _loaded(path, arch, kwargs)
