"""Intermediate features by layer name, without changing model definitions (for FitNets, AT, CRD, ...).

    taps = FeatureTaps(model, ["stages.1", "stages.2"])
    logits, features = taps(images)  # features["stages.1"]: that module's output in this forward pass

Layer names are those of `model.named_modules()`. Forward hooks are attached for the duration of a
call only, so a model never keeps hooks (nor references to activations) after a call, even one
that raised. `default_feature_layers(model, info)` names the stage outputs to tap when a loss is
given no layer names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import DistillError, did_you_mean
from ..data import DatasetInfo

_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class FeatureTaps:
    """Calls `model` and also returns the outputs of its submodules named in `layers`.

    A module that runs several times in one forward pass reports its last output. An output that a
    later in-place operation overwrites (a BatchNorm followed by `ReLU(inplace=True)`, common in
    torchvision models; the zoo uses no in-place ops) raises DistillError rather than returning values
    that are not that module's output.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]):
        modules = {name: module for name, module in model.named_modules() if name}
        self.model = model
        self.layers = tuple(layers)
        for name in self.layers:
            if name not in modules:
                raise DistillError(
                    f"unknown layer {name!r} in {type(model).__name__}: {did_you_mean(name, modules)}"
                )
        self._modules = [modules[name] for name in self.layers]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """`(model(*args, **kwargs), {layer name: its output})`, the dict in the order of `layers`."""
        captured: dict[str, tuple[Any, int | None]] = {}
        handles = [
            module.register_forward_hook(partial(_capture, captured, name))
            for name, module in zip(self.layers, self._modules)
        ]
        try:
            output = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        features = {}
        for name in self.layers:
            if name not in captured:
                raise DistillError(f"layer {name!r} did not run in the forward pass of {type(self.model).__name__}")
            value, version = captured[name]
            if version is not None and value._version != version:
                raise DistillError(
                    f"layer {name!r}: its output was overwritten in place later in the forward pass "
                    "(e.g. by ReLU(inplace=True)); tap the module that follows it instead"
                )
            features[name] = value
        return output, features


def _capture(captured: dict, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
    """Forward hook: keep `output` and its version counter. Inference tensors have no version counter,
    so under inference mode a copy is kept instead: a later in-place op cannot change what was captured."""
    if isinstance(output, Tensor) and output.is_inference():
        captured[name] = (output.clone(), None)
    else:
        captured[name] = (output, output._version if isinstance(output, Tensor) else None)


def default_feature_layers(model: nn.Module, info: DatasetInfo) -> list[str]:
    """The layers a feature-based loss taps when told none: one per stage, shallow to deep.

    - timm models: the modules of their `feature_info` (timm's feature API), in its order.
    - Zoo CNNs (a `stages` child, see `layers.zoo_net`): `stages.0`, `stages.1`, ..., each stage's
      output before pooling, the points where the reference code (RepDistiller) returns features.
    - Other CNNs (torchvision models, `cnn`): one dummy forward pass (eval mode, no grad, one image
      of `info`'s shape) finds, for each spatial size in the order they appear, the outermost module
      producing the last feature map of that size. Global (adaptive) pooling is not a stage. Stages
      whose maps shrink to the same size on tiny images merge into one.
    - Networks without feature maps (MLPs): each hidden layer's output, i.e. the module producing
      the input of each Linear layer but the first.
    """
    timm_features = getattr(model, "feature_info", None)  # timm's feature API: the modules its features come from
    if isinstance(timm_features, list) and timm_features and all("module" in entry for entry in timm_features):
        return [entry["module"] for entry in timm_features]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Module):
        return [f"stages.{name}" for name, _ in stages.named_children()]
    records = _trace(model, info)
    last_of_size: dict[tuple[int, ...], str] = {}
    for name, module, _, output in records:
        if isinstance(output, Tensor) and output.dim() == 4 and not isinstance(module, _GLOBAL_POOLS):
            last_of_size[tuple(output.shape[-2:])] = name
    if last_of_size:
        return list(last_of_size.values())
    producer = {id(output): name for name, _, _, output in records}
    linear_inputs = [producer.get(id(inputs[0])) for _, module, inputs, _ in records if isinstance(module, nn.Linear)]
    return [name for name in linear_inputs[1:] if name is not None]


def _trace(model: nn.Module, info: DatasetInfo) -> list[tuple[str, nn.Module, tuple, Any]]:
    """(name, module, inputs, output) of every submodule, in the order they finish, for one dummy image."""
    records: list[tuple[str, nn.Module, tuple, Any]] = []

    def record(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        records.append((name, module, inputs, output))

    handles = [module.register_forward_hook(partial(record, name)) for name, module in model.named_modules() if name]
    parameter = next(model.parameters(), None)
    like = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, info.channels, *info.image_size, **like))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return records


def feature_points(model: nn.Module, info: DatasetInfo) -> dict[str, str]:
    """The named feature points of `model` a KD method can ask for, mapped to torch.fx node names.

    - `stem` (zoo CNNs): the stem's output.
    - `stage1` ... `stageN` (CNNs): each stage's output, shallow to deep (`default_feature_layers`).
    - `pooled`: the embedding the classifier reads (the input of the final Linear layer), (batch, dim).
    - `logits`: the model's output.
    MLPs have no feature maps, so only `pooled` and `logits`. A model torch.fx cannot trace has none
    (only its logits, by a plain forward pass).
    """
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        _, nodes = get_graph_node_names(model)
    except Exception:  # noqa: BLE001 - torch.fx raises many kinds of errors on untraceable code
        return {}
    points = {}
    if isinstance(getattr(model, "stem", None), nn.Module):
        points["stem"] = "stem"
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        for number, name in enumerate(default_feature_layers(model, info), start=1):
            points[f"stage{number}"] = name
    last = nodes[-1]
    try:
        is_linear = isinstance(model.get_submodule(last), nn.Linear)
    except AttributeError:  # a function, not a module, makes the output
        is_linear = False
    if is_linear and len(nodes) > 1:
        points["pooled"] = nodes[-2]
    points["logits"] = last
    return points


def stage_points(points: Iterable[str]) -> list[str]:
    """The `stageN` points among `points`, in order."""
    return sorted((p for p in points if p.startswith("stage")), key=lambda p: int(p[len("stage"):]))


def feature_extractor(model: nn.Module, info: DatasetInfo, points: Iterable[str], role: str) -> nn.Module:
    """A torch.fx GraphModule that runs `model` and returns `{point: tensor}` for `points` plus "logits".

    It shares `model`'s submodules and parameters (training it trains `model`). `role` (e.g.
    "student=mlp_small") names the model in the error raised for a point `model` does not have.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    available = feature_points(model, info)
    nodes = {}
    for point in (*points, "logits"):
        if point not in available:
            have = ", ".join(p for p in available if p != "logits") or "none (not traceable by torch.fx)"
            raise DistillError(f"{role} has no feature point {point!r} (it has: {have})")
        nodes[available[point]] = point
    extractor = create_feature_extractor(model, return_nodes=nodes)
    return extractor.train(model.training)


@dataclass
class Outputs:
    """What one forward pass of a network hands a method: its logits and the feature points asked for."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
