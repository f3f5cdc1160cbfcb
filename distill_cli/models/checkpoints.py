"""Networks rebuilt from distill checkpoints, checked before their weights are trusted: the architecture a
config names, the dataset's classes, weights that fit. Every command that loads a model goes through here
(the teacher and baseline of a kd run, ensemble members, eval/export/quantize).

A given checkpoint (`teacher.checkpoint=`) may also be another tool's file (`peer_checkpoint`): a
RepDistiller / mdistiller CIFAR file (`{"model": state_dict, ...}` with their layer names, renamed by the
explicit rules of `PEER_NAMES`, for the zoo's ResNet, ResNet50, WRN, VGG, MobileNetV2 and ShuffleNet V1/V2; no
fuzzy matching), or a plain state dict: torchvision's and timm's names are the model's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import FORMAT_VERSION, distill_checkpoint, load_checkpoint, read_checkpoint_file
from ..core.config import ModelConfig
from ..core.errors import DistillError
from ..data import DatasetInfo
from . import build_model, model_arguments
from .shapes import reshape, shape_changes


def describe(arch: str, kwargs: dict) -> str:
    """A network as `cnn(blocks=2, width=16)`."""
    return f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"


# RepDistiller's and mdistiller's layer names (RepDistiller models/resnet.py, wrn.py, vgg.py, mobilenetv2.py,
# ShuffleNetv1.py and ShuffleNetv2.py; mdistiller's mdistiller/models/cifar/ are the same) -> distill's, per
# architecture: (pattern, name) rules, the first whose pattern matches the whole key renames it; {stage} is
# their 1-based layer/block - 1
RENAME_PARAMETER = r"(?P<p>\w+)"


def _conv_bn(conv: str, batch_norm: str, ours: str) -> tuple[tuple[str, str], ...]:
    """The rules for a conv and its BatchNorm of theirs (patterns `conv`, `batch_norm`) -> ours `ours.0`, `ours.1`."""
    return ((rf"{conv}\.{{p}}", f"{ours}.0.{{p}}"), (rf"{batch_norm}\.{{p}}", f"{ours}.1.{{p}}"))


def _vgg_names() -> tuple[tuple[str, str], ...]:
    """Their `block<g>` is a Sequential of (conv, BN, ReLU) per conv (the last ReLU dropped): conv n at 3n, its
    BN at 3n + 1. Ours: the stem's conv_bn n, and stage g - 1's, after the stage's max pool (stages 0-2; the
    last group has none for images under 64 px: their CIFAR files)."""
    rules: list[tuple[str, str]] = []
    for group in range(5):
        for n in range(4):  # at most 4 convs a group (vgg19)
            ours = f"stem.{n}" if group == 0 else f"stages.{group - 1}.{n + (1 if group < 4 else 0)}"
            rules += _conv_bn(rf"block{group}\.{3 * n}", rf"block{group}\.{3 * n + 1}", ours)
    return (*rules, (r"classifier\.{p}", "head.fc.{p}"))


# MobileNetV2: their 7 block groups -> ours (stage, group in it): a new stage at each stride-2 group
MOBILENET_GROUPS = ((0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1))


def _mobilenet_names() -> tuple[tuple[str, str], ...]:
    """Their `blocks.<g>.<b>.conv` is (conv, BN, ReLU, conv, BN, ReLU, conv, BN): ours `body.<k>` conv_bn k."""
    rules = [*_conv_bn(r"conv1\.0", r"conv1\.1", "stem")]
    for group, (stage, position) in enumerate(MOBILENET_GROUPS):
        for k in range(3):
            block = rf"blocks\.{group}\.(?P<b>\d+)\.conv"
            rules += _conv_bn(rf"{block}\.{3 * k}", rf"{block}\.{3 * k + 1}", f"stages.{stage}.{position}.{{b}}.body.{k}")
    return (*rules, *_conv_bn(r"conv2\.0", r"conv2\.1", "head.pre"), (r"classifier\.0\.{p}", "head.fc.{p}"))


def _shufflenet_names(version: int) -> tuple[tuple[str, str], ...]:
    """V1: unit `layer<L>.<b>` conv1/2/3 + bn1/2/3 -> our `body.0`, `body.2` (after the shuffle), `body.3`.
    V2: the stride-2 unit `layer<L>.0` conv1-2 (left) and conv3-5 (right) -> `left.0-1`, `right.0-2`; the
    others `layer<L>.<b>` conv1-3 -> `branch.0-2`; their conv2/bn2 after the stages -> `head.pre`."""
    unit = r"layer(?P<layer>[1-3])\.(?P<b>\d+)"
    rules = [*_conv_bn(r"conv1", r"bn1", "stem")]
    if version == 1:
        for k, ours in ((1, "body.0"), (2, "body.2"), (3, "body.3")):
            rules += _conv_bn(rf"{unit}\.conv{k}", rf"{unit}\.bn{k}", f"stages.{{stage}}.{{b}}.{ours}")
    else:
        down = r"layer(?P<layer>[1-3])\.0"
        for k, ours in ((1, "left.0"), (2, "left.1"), (3, "right.0"), (4, "right.1"), (5, "right.2")):
            rules += _conv_bn(rf"{down}\.conv{k}", rf"{down}\.bn{k}", f"stages.{{stage}}.0.{ours}")
        basic = r"layer(?P<layer>[1-3])\.(?P<b>[1-9]\d*)"
        for k in (1, 2, 3):
            rules += _conv_bn(rf"{basic}\.conv{k}", rf"{basic}\.bn{k}", f"stages.{{stage}}.{{b}}.branch.{k - 1}")
        rules += _conv_bn(r"conv2", r"bn2", "head.pre")
    return (*rules, (r"linear\.{p}", "head.fc.{p}"))


PEER_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "resnet_cifar": (
        (r"conv1\.{p}", "stem.0.{p}"),
        (r"bn1\.{p}", "stem.1.{p}"),
        (r"layer(?P<layer>[1-3])\.(?P<b>\d+)\.conv1\.{p}", "stages.{stage}.{b}.body.0.0.{p}"),
        (r"layer(?P<layer>[1-3])\.(?P<b>\d+)\.bn1\.{p}", "stages.{stage}.{b}.body.0.1.{p}"),
        (r"layer(?P<layer>[1-3])\.(?P<b>\d+)\.conv2\.{p}", "stages.{stage}.{b}.body.1.0.{p}"),
        (r"layer(?P<layer>[1-3])\.(?P<b>\d+)\.bn2\.{p}", "stages.{stage}.{b}.body.1.1.{p}"),
        (r"layer(?P<layer>[1-3])\.(?P<b>\d+)\.downsample\.(?P<i>[01])\.{p}", "stages.{stage}.{b}.shortcut.{i}.{p}"),
        (r"fc\.{p}", "head.fc.{p}"),
    ),
    "resnet_bottleneck": (  # RepDistiller's models/resnetv2.py (its ResNet50): bottleneck blocks, `shortcut`, `linear`
        (r"conv1\.{p}", "stem.0.{p}"),
        (r"bn1\.{p}", "stem.1.{p}"),
        *(
            rule
            for k in range(3)
            for rule in _conv_bn(
                rf"layer(?P<layer>[1-4])\.(?P<b>\d+)\.conv{k + 1}", rf"layer(?P<layer>[1-4])\.(?P<b>\d+)\.bn{k + 1}",
                f"stages.{{stage}}.{{b}}.body.{k}",
            )
        ),
        (r"layer(?P<layer>[1-4])\.(?P<b>\d+)\.shortcut\.(?P<i>[01])\.{p}", "stages.{stage}.{b}.shortcut.{i}.{p}"),
        (r"linear\.{p}", "head.fc.{p}"),
    ),
    "wrn": (  # without dropout (their teachers' dropRate 0): the second conv is body.3
        (r"conv1\.{p}", "stem.{p}"),
        (r"block(?P<layer>[1-3])\.layer\.(?P<b>\d+)\.bn1\.{p}", "stages.{stage}.{b}.preact.0.{p}"),
        (r"block(?P<layer>[1-3])\.layer\.(?P<b>\d+)\.conv1\.{p}", "stages.{stage}.{b}.body.0.{p}"),
        (r"block(?P<layer>[1-3])\.layer\.(?P<b>\d+)\.bn2\.{p}", "stages.{stage}.{b}.body.1.{p}"),
        (r"block(?P<layer>[1-3])\.layer\.(?P<b>\d+)\.conv2\.{p}", "stages.{stage}.{b}.body.3.{p}"),
        (r"block(?P<layer>[1-3])\.layer\.(?P<b>\d+)\.convShortcut\.{p}", "stages.{stage}.{b}.shortcut.{p}"),
        (r"bn1\.{p}", "head.pre.0.{p}"),
        (r"fc\.{p}", "head.fc.{p}"),
    ),
    "vgg": _vgg_names(),
    "mobilenetv2": _mobilenet_names(),
    "shufflenetv1": _shufflenet_names(1),
    "shufflenetv2": _shufflenet_names(2),
}
# families whose plain state dicts carry the model's own names (torchvision's and timm's modules are ours)
OWN_NAMES = ("torchvision", "timm")
PEERS = "RepDistiller/mdistiller"


def _renamed(name: str, arch: str) -> str | None:
    """`name` of a RepDistiller/mdistiller `arch` as distill names it, None if no rule of `PEER_NAMES` fits."""
    for pattern, target in PEER_NAMES[arch]:
        match = re.fullmatch(pattern.replace("{p}", RENAME_PARAMETER), name)
        if match:
            groups = match.groupdict()
            stage = int(groups.pop("layer")) - 1 if "layer" in groups else None
            return target.format(stage=stage, **groups)
    return None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def peer_checkpoint(loaded: Any, expected: ModelConfig, key: str, path: Path, num_classes: int) -> dict | None:
    """Another tool's file (as `read_checkpoint_file` returns it) as a distill checkpoint of `expected`'s
    network: a RepDistiller/mdistiller `{"model": state_dict}` or a bare state dict of their names, renamed by
    `PEER_NAMES`; a plain torchvision/timm state dict as it is. DataParallel's `module.` prefix is dropped.
    None when `loaded` is a distill checkpoint; a file no rule reads is refused naming its first odd key."""
    if isinstance(loaded, dict) and "arch" in loaded:
        return None
    state = loaded.get("model") if isinstance(loaded, dict) and _is_state_dict(loaded.get("model")) else loaded
    if not _is_state_dict(state):
        return distill_checkpoint(loaded, path)  # refused, saying what the file holds
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    if expected.arch not in OWN_NAMES:
        if expected.arch not in PEER_NAMES:
            raise DistillError(
                f"{key}.checkpoint {path} is no distill checkpoint, and {PEERS} files are read for "
                f"{', '.join(PEER_NAMES)} ({key}={expected.label} is {expected.arch})"
            )
        renamed = {name: _renamed(name, expected.arch) for name in state}
        odd = next((name for name, new in renamed.items() if new is None), None)
        if odd is not None:
            raise DistillError(f"{key}.checkpoint {path}: {odd!r} is no layer of {PEERS}'s {expected.arch}; is it a {expected.label}?")
        state = {renamed[name]: tensor for name, tensor in state.items()}
    return {"format_version": FORMAT_VERSION, "arch": expected.arch, "kwargs": dict(expected.kwargs), "num_classes": num_classes, "state_dict": state}


def checked_checkpoint(path: Path, expected: ModelConfig, key: str, info: DatasetInfo) -> dict:
    """The checkpoint at `path` (a distill checkpoint or another tool's, see `peer_checkpoint`), refused unless
    it holds `key`'s architecture with the same arguments and the dataset's class count."""
    loaded = read_checkpoint_file(path)
    checkpoint = peer_checkpoint(loaded, expected, key, path, info.num_classes) or distill_checkpoint(loaded, path)
    same_network = checkpoint["arch"] == expected.arch and model_arguments(
        expected.arch, checkpoint["kwargs"]
    ) == model_arguments(expected.arch, expected.kwargs)
    if not same_network:
        raise DistillError(
            f"{key}.checkpoint {path} holds {describe(checkpoint['arch'], checkpoint['kwargs'])} but {key}= is "
            f"{describe(expected.arch, expected.kwargs)}; choose the {key} config the checkpoint was trained with"
        )
    if checkpoint["num_classes"] != info.num_classes:
        raise DistillError(
            f"{key}.checkpoint {path} predicts {checkpoint['num_classes']} classes but dataset "
            f"{info.name} has {info.num_classes}"
        )
    return checkpoint


def first_misfit(model: nn.Module, state_dict: dict) -> str | None:
    """The first tensor of `state_dict` that does not fit `model` (missing, extra, or of another shape), or None."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state_dict:
            return f"it lacks {name!r}"
        if state_dict[name].shape != tensor.shape:
            return f"{name!r} is {tuple(state_dict[name].shape)}, the network's {tuple(tensor.shape)}"
    extra = next((name for name in state_dict if name not in own), None)
    return None if extra is None else f"{extra!r} is no tensor of the network"


def load_weights(model: nn.Module, state_dict: dict, refusal: str) -> nn.Module:
    """`model` with `state_dict` loaded; weights that do not fit raise `refusal: <the first that does not>`."""
    misfit = first_misfit(model, state_dict)
    if misfit:
        raise DistillError(f"{refusal}: {misfit}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise DistillError(f"{refusal}: {str(error).strip().splitlines()[0]}") from None
    return model


def rebuilt_model(checkpoint: dict, expected: ModelConfig, key: str, path: Path, info: DatasetInfo) -> nn.Module:
    """`expected`'s network with the pruned layer shapes the checkpoint records (`shapes.reshape`, its
    "layers") and its weights, as trained (not frozen). A pruned network's layers come from the file, so it is
    first rebuilt without weights and refused in one line unless it takes `info`'s images (a file of other data)."""
    layers = checkpoint.get("layers") or {}
    if layers:
        with torch.device("meta"):
            shaped = reshape(build_model(expected, info, key), layers, checkpoint["state_dict"], str(path))
            takes_inputs(shaped, info, f"{key}.checkpoint {path}")
    model = reshape(build_model(expected, info, key), layers, checkpoint["state_dict"], str(path))
    return load_weights(model, checkpoint["state_dict"], f"{key} checkpoint {path} does not fit {key}={expected.arch}")


def takes_inputs(model: nn.Module, info: DatasetInfo, name: str) -> None:
    """Refuse in one line, naming the network as `name`, a `model` that does not take `info`'s images (run on
    an input of their shape on `model`'s device: the meta device checks shapes without computing)."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, info.channels, *info.image_size, device=device))
    except RuntimeError as error:
        shape = "x".join(map(str, (info.channels, *info.image_size)))
        reason = str(error).splitlines()[0]
        raise DistillError(f"{name} does not take {info.name}'s {shape} images ({reason}); was it trained on other data?") from None


def recorded_layers(model: nn.Module, cfg: ModelConfig, info: DatasetInfo) -> dict:
    """The layers of `model` whose channel counts differ from `cfg`'s network as built (pruned ones): what a
    checkpoint records so that `rebuilt_model` rebuilds it ({} for an unpruned network)."""
    with torch.device("meta"):
        reference = build_model(cfg, info, "model")
    return shape_changes(model, reference)


def checked_model(checkpoint: dict, expected: ModelConfig, key: str, path: Path, info: DatasetInfo) -> nn.Module:
    """`expected`'s network with the weights of `checkpoint` (as `checked_checkpoint` returns it), frozen."""
    return rebuilt_model(checkpoint, expected, key, path, info).eval().requires_grad_(False)


def model_from_checkpoint(path: Path, info: DatasetInfo) -> tuple[nn.Module, str]:
    """The model of a distill checkpoint in eval mode on the CPU, its architecture read from the file,
    refused unless it was trained for `info`'s data; and its name (`cnn(blocks=2, width=16)`)."""
    checkpoint = load_checkpoint(path)
    dataset = checkpoint.get("dataset")
    if (dataset is not None and dataset != info.name) or checkpoint["num_classes"] != info.num_classes:
        raise DistillError(
            f"{path} was trained on {dataset or 'another dataset'} ({checkpoint['num_classes']} classes), "
            f"not on {info.name} ({info.num_classes} classes)"
        )
    arch, kwargs = checkpoint["arch"], checkpoint["kwargs"]
    model = rebuilt_model(checkpoint, ModelConfig(arch=arch, kwargs=kwargs), "model", path, info)
    return model.eval().requires_grad_(False), describe(arch, kwargs) + (" pruned" if checkpoint.get("layers") else "")
