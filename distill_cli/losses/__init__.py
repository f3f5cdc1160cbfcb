"""Distillation losses, one module per method, registered by name (`loss=<name>`).

A loss is built as `factory(T=..., alpha=...)` and called as
`loss(student_logits, teacher_logits, targets) -> dict` with the total under "loss" and each
part (for logging) under its own name.
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry


def _register_all() -> None:
    from . import hinton  # noqa: F401


LOSSES: Registry = Registry("loss", _register_all)


def build_loss(name: str, T: float, alpha: float) -> nn.Module:
    return LOSSES.get(name)(T=T, alpha=alpha)
