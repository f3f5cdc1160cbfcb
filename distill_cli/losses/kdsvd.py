"""KDSVD (Lee et al. 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition"),
computed as mdistiller computes it: the student matches how the leading singular vectors of consecutive
stage outputs relate, through a radial basis function.

Per stage, each sample's (C, H, W) map is read as a (C*H, W) matrix (mdistiller's layout of the NCHW
port; the paper's TF code decomposes the (H*W, C) matrix) and decomposed, X = U S V^T. The teacher
keeps its k leading right singular vectors, the student its k + 3; each teacher vector is matched by the
student vector of largest |cosine| with it, sign-aligned; both sets are scaled by the teacher's k leading
singular values, L2-normalised over the k. For consecutive stages i-1, i the RBF
R[p, q, n] = exp(-(v_i[p, n] - v_{i-1}[q, n])^2 / 8) over positions p, q and vector n is compared:

    kdsvd = weight * sum over consecutive stage pairs of sum (R_student - R_teacher)^2 / B

with non-finite entries (degenerate decompositions) counted as 0, as mdistiller does; so are the non-finite
entries of the gradient through the decomposition (a sample's map of zeros, whose singular values repeat,
makes SVD's backward divide by zero; unguarded, one such map turns the student's weights into NaN). Defaults as
mdistiller's `KDSVD` config: k 1, weight 1, every stage output after the stem, CE weight 1. Nets with
different stage counts pair their stages from the deepest back; paired maps of different sizes: the
larger is average-pooled to the smaller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import LOSSES
from .base import Method, match_size, non_negative, require, stage_pairs

RBF_WIDTH = 8.0  # the denominator of the RBF, as mdistiller


def finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular(feature: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(singular values (B, n), right singular vectors (B, W, n)) of each sample's (C*H, W) matrix: the
    `count` leading ones (fewer if W or C*H is smaller), values L2-normalised, vectors unit columns."""
    batch, channels, height, width = feature.shape
    matrix = feature.reshape(batch, channels * height, width)
    if matrix.requires_grad:  # repeated singular values (a map of zeros after a ReLU) give SVD's backward inf or NaN
        matrix.register_hook(finite)
    _, values, vectors_t = torch.linalg.svd(matrix, full_matrices=False)
    values, vectors = finite(values)[:, :count], finite(vectors_t.transpose(1, 2))[:, :, :count]
    return F.normalize(values, dim=1), F.normalize(vectors, dim=1)


def align(student: Tensor, teacher: Tensor) -> Tensor:
    """For each teacher vector (column of `teacher`, (B, W, k)), the student column (of (B, W, m)) of
    largest |cosine| with it, times the sign of that cosine: (B, W, k)."""
    cosine = student.transpose(1, 2) @ teacher  # (B, m, k)
    best = cosine.abs() == cosine.abs().amax(dim=1, keepdim=True)
    return student @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))


def rbf(vectors: Tensor, previous: Tensor) -> Tensor:
    """(B, W_i, W_{i-1}, k): exp(-(v_i[p, n] - v_{i-1}[q, n])^2 / 8)."""
    return torch.exp(-(vectors.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / RBF_WIDTH)


@LOSSES.register("kdsvd")
class KDSVD(Method):
    """weight * squared difference of RBFs between consecutive stages' leading singular vectors, per sample."""

    def __init__(self, weight: float = 1.0, k: int = 1):
        super().__init__()
        non_negative("loss.weight", weight)
        require(k >= 1, "loss.k", f"must be >= 1, got {k}")
        self.weight = weight
        self.k = k
        self.student_points = self.teacher_points = ("stages",)

    def forward(self, student, teacher, batch, epoch):
        total, previous = 0.0, None
        with torch.autocast(student.logits.device.type, enabled=False):
            for student_stage, teacher_stage in stage_pairs(student.features, teacher.features):
                student_map, teacher_map = match_size(
                    student.features[student_stage].float(), teacher.features[teacher_stage].float()
                )
                teacher_values, teacher_vectors = leading_singular(teacher_map, self.k)
                _, student_vectors = leading_singular(student_map, self.k + 3)
                scale = teacher_values.unsqueeze(1)
                current = align(student_vectors, teacher_vectors) * scale, teacher_vectors * scale
                if previous is not None:
                    difference = (rbf(current[0], previous[0]) - rbf(current[1], previous[1])).pow(2)
                    total = total + finite(difference).sum() / student_map.shape[0]
                previous = current
        return {"kdsvd": self.weight * total}
