"""Inference copies of frozen models: BatchNorm folded into the layer before it.

A frozen teacher's BatchNorm applies a fixed per-channel scale and shift, which can be folded into
the weights and bias of the convolution (or linear layer) that feeds it: one pass over the
activations less per layer, the same outputs up to float rounding. kd steps, which run the teacher
on every batch, use the folded copy; evaluation and checkpoints use the model itself.
"""

from __future__ import annotations

import copy
import logging

from torch import fx, nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger("distill")


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each BatchNorm that alone consumes a conv/linear output folded
    into that layer. For a model torch.fx cannot trace (data-dependent control flow), a plain eval-mode copy."""
    frozen = copy.deepcopy(model).eval()
    try:
        return fuse(frozen, inplace=True)
    except (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as error:
        log.debug(f"BatchNorm folding skipped ({type(model).__name__} is not traceable: {error})")
        return frozen
