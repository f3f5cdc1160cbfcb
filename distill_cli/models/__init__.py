"""Model zoo: each module registers factories called as `factory(info, **kwargs)`.

`build_model` adapts every architecture to the dataset (input channels, image size, classes)
so a config names only the architecture and its own hyperparameters.

May import: `core`, `data` and other `models` modules.
"""

from __future__ import annotations

import inspect
import warnings

from torch import nn

from ..core.config import ModelConfig
from ..core.errors import DistillError
from ..core.registry import Registry
from ..data import DatasetInfo


def _register_all() -> None:
    from . import cnn, mlp, mobilenet, resnet, shufflenet, timm_models, torchvision_adapter, vgg, wrn  # noqa: F401


MODELS: Registry = Registry("model", _register_all)


def build_model(cfg: ModelConfig, info: DatasetInfo, key: str) -> nn.Module:
    """Build `cfg.arch` for `info`'s data; `key` ('teacher' or 'student') names the config node in errors."""
    factory = MODELS.get(cfg.arch)
    accepted = inspect.signature(factory).parameters
    for name in cfg.kwargs:
        if name not in accepted or name == "info":
            raise DistillError(
                f"{key}.kwargs.{name}: not an argument of model {cfg.arch!r} "
                f"(accepted: {', '.join(p for p in accepted if p != 'info')})"
            )
    try:
        with warnings.catch_warnings():  # an empty layer is reported below, in one line
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = factory(info, **cfg.kwargs)
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as error:
        raise DistillError(f"{key}.kwargs {_arguments(cfg.kwargs)}: make no {cfg.arch} network ({_first_line(error)})") from None
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    if empty or not any(True for _ in model.parameters()):
        where = f"the layer {empty[0].rsplit('.', 1)[0]} is empty" if empty else "it has no parameters"
        raise DistillError(f"{key}.kwargs {_arguments(cfg.kwargs)}: make no usable {cfg.arch} network ({where})")
    return model


def model_arguments(arch: str, kwargs: dict) -> dict:
    """Every argument `arch`'s factory gets from `kwargs`, defaults filled in: two configs that build the
    same network compare equal."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(MODELS.get(arch)).parameters.items()
        if name != "info" and p.default is not inspect.Parameter.empty
    }
    # a tuple default and a YAML list of the same values are the same argument
    return {name: list(value) if isinstance(value, tuple) else value for name, value in {**defaults, **kwargs}.items()}


def _arguments(kwargs: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in kwargs.items()) or "(defaults)"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases; BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
