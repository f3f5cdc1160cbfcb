"""Building blocks shared by the CIFAR model zoo (ResNet, WRN, VGG, MobileNetV2, ShuffleNets).

Every zoo network is `zoo_net(stem, stages, head)`: an `nn.Sequential` with the children `stem`,
`stages` (one child per feature stage, `stages.0`, `stages.1`, ...) and `head` (optional last
convolution, global average pooling, `head.fc`). `features.default_feature_layers` relies on the
`stages` name. ReLUs are not in-place, so a tapped layer's output is never overwritten later.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from torch import nn


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
    bias: bool = False,
) -> nn.Sequential:
    """Conv ('same' padding) -> BatchNorm -> ReLU (unless `relu=False`)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def stage(
    block: Callable[..., nn.Module], in_channels: int, out_channels: int, count: int, stride: int, **kwargs
) -> nn.Sequential:
    """`count` blocks: the first maps `in_channels` to `out_channels` with `stride`, the rest keep the shape."""
    blocks = [block(in_channels, out_channels, stride, **kwargs)]
    blocks += [block(out_channels, out_channels, 1, **kwargs) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


def resolution_stages(
    block: Callable[..., nn.Module], in_channels: int, widths: Sequence[int], count: int | Sequence[int], **kwargs
) -> list[nn.Sequential]:
    """One `stage` per width, of `count` blocks (one count for every stage, or one per stage); the first stage keeps
    the resolution, each later one halves it."""
    counts = [count] * len(widths) if isinstance(count, int) else count
    stages = []
    for index, (width, blocks) in enumerate(zip(widths, counts, strict=True)):
        stages.append(stage(block, in_channels, width, blocks, stride=1 if index == 0 else 2, **kwargs))
        in_channels = width
    return stages


def classifier_head(channels: int, num_classes: int, pre: nn.Module | None = None) -> nn.Sequential:
    """[`pre` (a last conv or BN-ReLU)] -> global average pool -> flatten -> `fc`.

    Adaptive pooling makes every zoo model run on any image size (8x8 digits, 28x28 MNIST, 32x32 CIFAR).
    """
    layers: list[tuple[str, nn.Module]] = [("pre", pre)] if pre is not None else []
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(channels, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def zoo_net(
    stem: nn.Module,
    stages: Iterable[nn.Module],
    head: nn.Module,
    kaiming: bool = True,
    linear_std: float | None = None,
) -> nn.Sequential:
    """Assemble stem -> stages -> head and initialise it as the reference (RepDistiller) code does.

    With `kaiming`, convolutions get Kaiming-normal weights (fan-out, ReLU gain) and zero biases
    (ResNet, WRN, VGG, MobileNetV2); the ShuffleNets keep PyTorch's default init. BatchNorm starts at
    weight 1, bias 0. With `linear_std` the classifier's weights are N(0, std^2) and its bias zero
    (VGG, MobileNetV2); otherwise PyTorch's default Linear init is kept.
    """
    model = nn.Sequential(OrderedDict(stem=stem, stages=nn.Sequential(*stages), head=head))
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and kaiming:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
    return model
