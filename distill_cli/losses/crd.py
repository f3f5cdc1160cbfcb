"""Contrastive representation distillation (Tian, Krishnan and Isola 2020, "Contrastive Representation
Distillation", arXiv:1910.10699), with the memory-bank NCE estimator of the authors' RepDistiller code.

Both nets' pooled features go through trainable linear embeddings, L2-normalised: s_i, t_i (embed_dim).
Two memory banks (num_train x embed_dim buffers) hold a running embedding of every transfer-set sample,
one per net. For each sample i of a batch (its position p_i in the transfer set from `batch.index`) the
positive is p_i and the K negatives are positions drawn uniformly from the other classes. With
e_ij = exp(<bank[j], anchor_i> / temperature), P_ij = e_ij / Z and M = num_train, the NCE loss of one
anchor direction is

    -(1/B) sum_i [ log(P_i,pos / (P_i,pos + K/M)) + sum_{k=1..K} log((K/M) / (P_i,neg_k + K/M)) ]

with the critic h = P / (P + K/M) of the paper's NCE bound (noise density 1/M, K noise samples per
positive; RepDistiller's `ContrastLoss`). Z, an estimate of the partition function, is set on the first
batch to M * mean(e) and then frozen, a constant also in that batch's gradient (a buffer per direction,
saved with the banks). The term is weight * (student anchors against the teacher's bank + teacher
anchors against the student's bank). After the loss, each bank's rows at p_i become
normalize(momentum * row + (1 - momentum) * new embedding).

Defaults as RepDistiller and mdistiller: embed_dim 128, K = 16384, temperature 0.07, momentum 0.5,
weight 0.8 with CE weight 1 and no Hinton term. The embeddings' input sizes are the nets' pooled sizes
(mdistiller hard-codes 256, wrong for e.g. WRN). Deliberate differences from the peers:
- Negatives are drawn on the device, i.i.d. (with replacement, as NCE's noise samples are), from torch's
  global generator (saved in last.pt), instead of per sample without replacement in the data loader.
- Z is set and used without a host sync (`torch.where` on the buffer) and the scores are computed in fp32
  with autocast off (exp(x / 0.07) amplifies bf16 rounding of the dot products).
- Scores come from one product of the anchors with the whole bank, then a lookup, instead of gathering
  B * (1 + K) bank rows: the same numbers, several times faster (see `_scores`).
With several data-parallel processes (`device.processes`) every process keeps whole banks and they stay equal:
each step's rows are updated from every process's embeddings (gathered in rank order), Z is set from the mean over
all processes, and each process draws the negatives of the whole step's batch (every rank's generator is seeded
alike) and keeps its own rows, so N processes of batch B train what one process of batch N * B does (tested).
The banks cost 2 * num_train * embed_dim floats (RepDistiller #40: a queue would scale better), twice that
while a step keeps their copies, and a step about 64 bytes per score (B x (1 + K)): a run that would not fit
the free memory is refused before training (`planned_memory`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import LOSSES
from .base import Method, MethodContext, non_negative, positive, require

# what a step holds per score (B x (1 + K)) at its peak: the positions (int64), both directions' scores, their
# intermediates and gradients (measured: peak RSS of a CPU step with K = 10^6)
SCORE_BYTES = 64


@LOSSES.register("crd")
class ContrastiveRepresentation(Method):
    """weight * NCE of each net's embedding against the other's memory bank: same sample vs K other-class negatives."""

    def __init__(
        self,
        weight: float = 0.8,
        embed_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        non_negative("loss.weight", weight)
        positive("loss.embed_dim", embed_dim)
        positive("loss.negatives", negatives)
        positive("loss.temperature", temperature)
        require(0 <= momentum < 1, "loss.momentum", f"must be in [0, 1), got {momentum}")
        self.weight = weight
        self.embed_dim = embed_dim
        self.negatives = negatives
        self.temperature = temperature
        self.momentum = momentum
        self.student_points = self.teacher_points = ("pooled",)

    def setup(self, context: MethodContext) -> None:
        labels = context.train_labels
        counts = torch.bincount(labels, minlength=context.num_classes)
        require(
            int((counts > 0).sum()) > 1,
            "loss=crd",
            "the transfer set has a single class, so there are no negatives from other classes",
        )
        self.embed_student = nn.Linear(context.student["pooled"].numel(), self.embed_dim)
        self.embed_teacher = nn.Linear(context.teacher["pooled"].numel(), self.embed_dim)
        bound = 1 / math.sqrt(self.embed_dim / 3)  # rows of about unit norm, as RepDistiller starts them
        for name in ("student_bank", "teacher_bank"):
            self.register_buffer(name, torch.empty(context.num_train, self.embed_dim).uniform_(-bound, bound))
        self.register_buffer("normaliser", torch.full((2,), -1.0))  # Z of (student, teacher) anchors; < 0: unset
        # positions grouped by class, to draw negatives from the other classes (derived: not saved)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_counts", counts, persistent=False)
        self.register_buffer("class_starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.world = context.world

    def planned_memory(self, context: MethodContext) -> dict[str, int]:
        """The two banks and the copies a step keeps of them; a step's scores and its products with both banks."""
        rows, batch, negatives = context.num_train, context.batch_size, self.negatives
        planned = {
            f"2 memory banks of {rows} x loss.embed_dim={self.embed_dim} floats and a step's copies": 4 * rows * self.embed_dim * 4,
            f"a step's batch_size={batch} x (1 + loss.negatives={negatives}) scores": batch * ((1 + negatives) * SCORE_BYTES + 4 * rows * 4),
        }
        others = context.world.size - 1
        if others:  # the draws for the other processes' rows (int64, and their remainders)
            planned[f"the other {others} processes' negatives, drawn here too"] = others * batch * negatives * 16
        return planned

    def draw_negatives(self, labels: Tensor) -> Tensor:
        """(B, K) transfer-set positions drawn uniformly, with replacement, among those of a class other than
        each label's, on the labels' device. With several processes: this process's rows of the draws for the
        whole step's batch (each process's generator is seeded alike), the draws of one process training on it."""
        count, start = self.class_counts[labels, None], self.class_starts[labels, None]
        rank, processes = self.world.rank, self.world.size
        # a uniform rank among the other classes' positions, then skip over the label's own block
        draws = torch.randint(0, 2**62, (processes * len(labels), self.negatives), device=labels.device)
        draws = draws[rank * len(labels) : (rank + 1) * len(labels)]
        rank = draws % (len(self.by_class) - count)
        return self.by_class[rank + (rank >= start) * count]

    def forward(self, student, teacher, batch, epoch):
        student_pooled, teacher_pooled = student.features["pooled"], teacher.features["pooled"]
        with torch.autocast(student_pooled.device.type, enabled=False):
            anchor_s = F.normalize(self.embed_student(student_pooled.float().flatten(1)), dim=1)
            anchor_t = F.normalize(self.embed_teacher(teacher_pooled.float().flatten(1)), dim=1)
            positions = torch.cat([batch.index[:, None], self.draw_negatives(batch.labels)], dim=1)
            scores_s = self._scores(self.teacher_bank, anchor_s, positions)  # student anchors, teacher's bank
            scores_t = self._scores(self.student_bank, anchor_t, positions)  # teacher anchors, student's bank
            scores = torch.stack([scores_s, scores_t])  # (2, B, 1 + K)
            num_train = len(self.student_bank)
            mean_score = self.world.sum(scores.detach().mean((1, 2))) / self.world.size  # the processes take equal shares
            normaliser = torch.where(self.normaliser < 0, mean_score * num_train, self.normaliser)
            self.normaliser.copy_(normaliser)
            loss = self._nce(scores / normaliser[:, None, None], self.negatives / num_train)
            with torch.no_grad():
                positions = self.world.gathered(batch.index)
                self._update(self.student_bank, positions, self.world.gathered(anchor_s))
                self._update(self.teacher_bank, positions, self.world.gathered(anchor_t))
        return {"crd": self.weight * loss}

    def _scores(self, bank: Tensor, anchors: Tensor, positions: Tensor) -> Tensor:
        """(B, 1 + K) exp(<bank row, anchor> / temperature) for each anchor's positive and negatives.

        One product of the anchors with the whole bank, then a lookup: it reads the bank once instead of
        gathering B * (1 + K) rows (537 MB at the defaults), less work whenever num_train < B * (1 + K). The
        product keeps a copy of the bank for its backward pass: the bank is updated before that runs."""
        return torch.exp((anchors @ bank.clone().T).gather(1, positions) / self.temperature)

    @staticmethod
    def _nce(probabilities: Tensor, noise: float) -> Tensor:
        """The NCE loss summed over directions: `probabilities` (directions, B, 1 + K), positive first;
        `noise` = K * the noise density."""
        positive_part = torch.log(probabilities[..., 0] / (probabilities[..., 0] + noise))
        negative_part = torch.log(noise / (probabilities[..., 1:] + noise)).sum(-1)
        return -(positive_part + negative_part).mean(-1).sum()

    def _update(self, bank: Tensor, positions: Tensor, embeddings: Tensor) -> None:
        """Rows `positions` of `bank` <- normalize(momentum * row + (1 - momentum) * embedding)."""
        mixed = self.momentum * bank[positions] + (1 - self.momentum) * embeddings.detach()
        bank.index_copy_(0, positions, F.normalize(mixed, dim=1))

