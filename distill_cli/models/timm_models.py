"""Any timm classifier by name (`teacher=timm teacher.kwargs.name=resnet50`): CNNs, ConvNeXts, ViTs.

Untrained (`pretrained=false`), or from a local weight file (`pretrained_file=PATH`, timm's own loading:
a classifier of another class count is left out and made for the dataset); nothing is downloaded, so
`pretrained=true` without a file is refused. A timm state dict of the whole network is also read by
`teacher.checkpoint=` (`models.checkpoints`). The model gets the dataset's channels and classes;
`model_args` go to `timm.create_model` (a ViT on 32x32 images: `+teacher.kwargs.model_args.img_size=32`).
Feature points come from timm's feature API: each entry of the model's `feature_info` is a stage
(`models.features`); a ViT's are token sequences, which the feature methods refuse (but `loss=ofa`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import DistillError, did_you_mean
from ..data import DatasetInfo
from . import MODELS


@MODELS.register("timm")
def timm_model(
    info: DatasetInfo, name: str = "resnet18", pretrained: bool = False, pretrained_file: str | None = None, model_args: dict | None = None
) -> nn.Module:
    """`timm.create_model(name, ...)` for the dataset's channels and classes, checked on one image of its size."""
    try:
        import timm  # here, not at the top: only this model needs it, and importing it takes seconds
    except ImportError:
        raise DistillError("model timm needs the timm package: pip install 'distill-cli[timm]'") from None
    if not timm.is_model(name):
        raise DistillError(f"unknown timm model {name!r}: {did_you_mean(name, timm.list_models())}")
    if pretrained and pretrained_file is None:
        raise DistillError(
            f"pretrained=true: timm would download {name}'s weights, and distill runs offline; give a local file "
            "(kwargs.pretrained_file=PATH) or a trained checkpoint (teacher.checkpoint=PATH)"
        )
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise DistillError(f"pretrained_file={pretrained_file}: no such file")
    local = {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained_file}} if pretrained_file else {}
    model = timm.create_model(name, num_classes=info.num_classes, in_chans=info.channels, **local, **(model_args or {}))
    try:  # a ViT built for other image sizes stops here, not in the first step
        with torch.no_grad():
            model.eval()(torch.zeros(1, info.channels, *info.image_size))
    except (AssertionError, RuntimeError) as error:
        size = "x".join(map(str, info.image_size))
        raise ValueError(f"it does not take the dataset's {size} images: {str(error).strip().splitlines()[0]}") from None
    return model.train()
