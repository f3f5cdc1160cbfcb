"""Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

Both terms come from `Objective` (top-level `T` and `alpha`), which adds them around every method;
`loss=kd` is that objective with no terms of its own. `alpha` weights the soft (teacher) term, as in
the paper, RepDistiller and mdistiller; torchdistill's `alpha` weights the CE term instead.
"""

from __future__ import annotations

from . import LOSSES
from .base import Method


@LOSSES.register("kd")
class HintonKD(Method):
    """Hinton KD: soft targets at temperature T (top-level T, alpha); alpha=0 trains the student alone."""

    reads_logits = True
    needs_teacher = False  # only through alpha > 0

    def forward(self, student, teacher, batch, epoch):
        return {}
