"""Any torchvision classification model by name (`teacher=torchvision teacher.kwargs.name=resnet50`).

Always randomly initialised (`weights=None`): nothing is downloaded. The classifier gets the dataset's
class count, and the first convolution is replaced (freshly initialised) when the dataset's images do
not have 3 channels. These are ImageNet architectures: their stems downsample aggressively, and
a few (the ViTs, inception_v3) refuse small images outright.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import DistillError, did_you_mean
from ..data import DatasetInfo
from . import MODELS


def _replace_first_conv(model: nn.Module, channels: int) -> None:
    """Swap the first Conv2d (in registration order, the stem in torchvision) for one taking `channels`."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == channels:
        return
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, new)


@MODELS.register("torchvision")
def torchvision_model(info: DatasetInfo, name: str = "resnet18") -> nn.Module:
    """`torchvision.models.get_model(name, weights=None)` adapted to the dataset's channels and classes."""
    import torchvision  # here, not at the top: importing it takes seconds, and only this model needs it

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise DistillError(f"unknown torchvision classification model {name!r}: {did_you_mean(name, available)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)
    _replace_first_conv(model, info.channels)
    return model
