"""The layer shapes of a network whose channels were pruned, recorded as plain numbers so that a checkpoint
stays loadable with `torch.load(weights_only=True)`: the architecture's config builds the network, then
`reshape` gives each recorded layer its pruned channel counts before the weights are loaded.

A record is `{module name: {attribute: int}}` for the layers whose counts differ from the architecture's
(`shape_changes`), e.g. `{"3": {"in_channels": 8, "out_channels": 8}, "4": {"num_features": 8}}`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import DistillError

# the constructor arguments of the layers that channel pruning changes (conv, linear, norm layers)
SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_channels", "num_groups")


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """`{module name: {attribute: value}}` of every layer with a channel count (`SHAPE_ATTRIBUTES`)."""
    shapes = {}
    for name, module in model.named_modules():
        attributes = {a: getattr(module, a) for a in SHAPE_ATTRIBUTES if isinstance(getattr(module, a, None), int)}
        if attributes:
            shapes[name] = attributes
    return shapes


def shape_changes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """The layers of `model` whose channel counts differ from `reference`'s (the same architecture as built)."""
    built = layer_shapes(reference)
    return {name: shape for name, shape in layer_shapes(model).items() if built.get(name) != shape}


def reshape(model: nn.Module, changes: dict[str, dict[str, int]], state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """`model` (as its architecture builds it) with each layer of `changes` given its recorded channel counts
    and its parameters and buffers the shapes of `state_dict` (uninitialised: the weights are loaded next).
    A layer the architecture does not have raises a one-line error naming `source`."""
    for name, attributes in changes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise DistillError(f"{source}: its pruned layer {name!r} is not in the architecture it names; it cannot be rebuilt") from None
        for attribute, value in attributes.items():
            setattr(module, attribute, value)
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            stored = state_dict.get(f"{name}.{key}" if name else key)
            if stored is None or stored.shape == tensor.shape:
                continue
            empty = torch.empty(stored.shape, dtype=tensor.dtype)
            setattr(module, key, nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty)
    return model
