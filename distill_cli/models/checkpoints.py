"""Networks rebuilt from distill checkpoints, checked before their weights are trusted: the architecture a
config names, the dataset's classes, weights that fit. Every command that loads a model goes through here
(the teacher and baseline of a kd run, ensemble members, eval/export/quantize)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import load_checkpoint
from ..core.config import ModelConfig
from ..core.errors import DistillError
from ..data import DatasetInfo
from . import build_model, model_arguments
from .shapes import reshape, shape_changes


def describe(arch: str, kwargs: dict) -> str:
    """A network as `cnn(blocks=2, width=16)`."""
    return f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"


def checked_checkpoint(path: Path, expected: ModelConfig, key: str, info: DatasetInfo) -> dict:
    """The checkpoint at `path`, refused unless it holds `key`'s architecture with the same arguments and
    the dataset's class count."""
    checkpoint = load_checkpoint(path)
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


def load_weights(model: nn.Module, state_dict: dict, refusal: str) -> nn.Module:
    """`model` with `state_dict` loaded; weights that do not fit raise `refusal: <torch's first line>`."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise DistillError(f"{refusal}: {str(error).strip().splitlines()[0]}") from None
    return model


def rebuilt_model(checkpoint: dict, expected: ModelConfig, key: str, path: Path, info: DatasetInfo) -> nn.Module:
    """`expected`'s network with the pruned layer shapes the checkpoint records (`shapes.reshape`, its
    "layers") and its weights, as trained (not frozen)."""
    model = build_model(expected, info, key)
    reshape(model, checkpoint.get("layers") or {}, checkpoint["state_dict"], str(path))
    return load_weights(model, checkpoint["state_dict"], f"{key} checkpoint {path} does not fit {key}={expected.arch}")


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
