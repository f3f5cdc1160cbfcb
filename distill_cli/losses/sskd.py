"""Self-supervised KD (Xu et al. 2020, "Knowledge Distillation Meets Self-Supervision", ECCV 2020, SSKD): each
image of a batch comes with its rotations by 90, 180 and 270 degrees, and both networks run on all 4B images.
Besides CE and Hinton KD on the batch's own B images (`Objective`, alpha and T), the student learns

    tf = tf_weight * tf_T^2 * mean over kept rotated rows of KL(softmax(t / tf_T) || softmax(s / tf_T))
    ss = ss_weight * ss_T^2 * mean over kept rotated rows of KL(softmax(t_sim / ss_T) || softmax(s_sim / ss_T))

with s, t the logits of a rotated image, and s_sim, t_sim its row of the (3B, B) cosine similarities between the
rotated images' and the batch's own images' projections: a head Linear(D, D) - ReLU - Linear(D, D) on each
network's pooled feature (the student's trained with it, the teacher's frozen while distilling). Rows are
kept by the teacher's error level: a row is wrong when the teacher ranks its target (tf: the image's label;
ss: its own image) below another entry; all right rows are kept, and of the wrong ones the fraction `tf_ratio`
/ `ss_ratio` (rounded down) with the target ranked highest. Before distillation the teacher's head trains
alone (`init_epochs` at `init_lr`, x0.1 at half and three quarters of them) on the cross-entropy of the
similarities (no temperature) against each rotated image's own image.

Defaults as the authors' CIFAR-100 code (xuguodong03/SSKD `student.py`, `wrapper.py`, `cifar.py`; torchdistill's
`SSKDLoss` computes the same terms): CE 0.1 and KD 0.9 at T 4 (alpha 0.9), tf 2.7 at T 4 with ratio 1, ss 10 at
T 0.5 with ratio 0.75, the teacher's head 60 epochs at lr 0.05 (milestones 30, 45). torchdistill's ImageNet
recipe weighs CE 1 (`loss.ce_weight=1`) and trains the head 30 epochs at lr 0.1. Deliberate differences:
- The rotations are made in the step from the augmented batch (one crop for the four), where the authors'
  dataset rotates the image first and crops each rotation on its own; images must be square.
- Rows are selected by a mask over a fixed shape (a stable order of the ranks, no host sync: CUDA-graph safe),
  the target's rank counting the entries strictly above it (the authors leave equal scores to argsort's order);
  among rows of equal rank at the cut the earlier is kept, where the authors' unstable sort picks any. The
  wrong rows kept are floor(wrong * ratio) in integers (the ratio as a fraction: exact on any device, float32
  is not), theirs `int(wrong * ratio)` in float64, one fewer where the product rounds below a whole number
  (90 x 0.7 -> 62, here 63; the published ratios 1 and 0.75 are exact in both). No kept row gives 0, not NaN.
- The heads compute in fp32 with autocast off, and the rotated rows follow the batch in blocks by rotation
  (image i's at B + i, 2B + i, 3B + i) where the authors interleave each image's four: the same terms.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import LOSSES
from .base import Method, MethodContext, Stage, non_negative, positive, require

ROTATIONS = 4  # the image itself and its rotations by 90, 180 and 270 degrees
TEACHER_HEAD_MILESTONES = (0.5, 0.75)  # the authors' epochs 30 and 45 of 60


def rotated(images: Tensor) -> Tensor:
    """(4B, C, H, W): the batch, then each image rotated by 90, 180 and 270 degrees (H towards W), in blocks."""
    return torch.cat([torch.rot90(images, turns, dims=(-2, -1)) for turns in range(ROTATIONS)])


def projection_head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def similarities(projected: Tensor, rows: int) -> Tensor:
    """(3B, B) cosine similarities of each rotated image's projection to the batch's own B images'."""
    normalised = F.normalize(projected, dim=1)
    return normalised[rows:] @ normalised[:rows].T


def own_images(rows: int, device: torch.device) -> Tensor:
    """(3B,) the position among the batch's B images of each rotated image's own."""
    return torch.arange(rows, device=device).repeat(ROTATIONS - 1)


def kept(scores: Tensor, targets: Tensor, ratio: float) -> Tensor:
    """(N,) 1.0 for the rows of `scores` (N, K) kept: those ranking `targets` first, and the fraction `ratio`
    (rounded down) of the others ranking it highest (fewest entries above it), the earlier row first on a tie."""
    rank = (scores > scores.gather(1, targets[:, None])).sum(1)
    wrong = (rank > 0).sum()
    fraction = Fraction(ratio).limit_denominator(10**6)  # floor(wrong * ratio) in integers: exact on any device
    keep = len(rank) - wrong + torch.div(wrong * fraction.numerator, fraction.denominator, rounding_mode="floor")
    position = torch.empty_like(rank).scatter_(0, torch.argsort(rank, stable=True), torch.arange(len(rank), device=rank.device))
    return (position < keep).float()


def kept_kl(student: Tensor, teacher: Tensor, temperature: float, keep: Tensor) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) of each row, averaged over the rows `keep` marks."""
    rows = F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1), reduction="none", log_target=True
    ).sum(1)
    return (rows * keep).sum() / keep.sum().clamp(min=1) * temperature**2


@LOSSES.register("sskd")
class SelfSupervisedKD(Method):
    """KD on each image's rotations (tf) and on their similarities to the batch's images (ss), rows kept by error level."""

    pretrains = True
    reads_logits = True
    min_batch = 2  # the similarities of a rotated image to the batch's: one image has only its own

    def __init__(
        self, tf_weight: float = 2.7, ss_weight: float = 10.0, tf_temperature: float = 4.0, ss_temperature: float = 0.5,
        tf_ratio: float = 1.0, ss_ratio: float = 0.75, init_epochs: int = 60, init_lr: float = 0.05,
    ):
        super().__init__()
        non_negative("loss.tf_weight", tf_weight)
        non_negative("loss.ss_weight", ss_weight)
        positive("loss.tf_temperature", tf_temperature)
        positive("loss.ss_temperature", ss_temperature)
        require(0 <= tf_ratio <= 1, "loss.tf_ratio", f"must be in [0, 1], got {tf_ratio}")
        require(0 <= ss_ratio <= 1, "loss.ss_ratio", f"must be in [0, 1], got {ss_ratio}")
        require(init_epochs >= 0, "loss.init_epochs", f"must be >= 0, got {init_epochs}")
        positive("loss.init_lr", init_lr)
        self.tf_weight, self.ss_weight = tf_weight, ss_weight
        self.tf_temperature, self.ss_temperature = tf_temperature, ss_temperature
        self.tf_ratio, self.ss_ratio = tf_ratio, ss_ratio
        self.init_epochs, self.init_lr = init_epochs, init_lr
        self.student_points = self.teacher_points = ("pooled",)

    def setup(self, context: MethodContext) -> None:
        if context.info is not None:
            height, width = context.info.image_size
            require(
                height == width, "loss=sskd",
                f"rotates each image by 90 degrees, which needs square images; dataset={context.dataset} has {height}x{width}",
            )
        self.student_head = projection_head(context.student["pooled"].numel())
        self.teacher_head = projection_head(context.teacher["pooled"].numel()).requires_grad_(False)  # trained in the stage only

    def step_images(self, images: Tensor) -> Tensor:
        return rotated(images)

    def stage(self) -> Stage | None:
        if self.init_epochs == 0:
            return None
        return Stage(self.init_epochs, self.teacher_head, self.rotation_pretext, lr=self.init_lr, milestones=TEACHER_HEAD_MILESTONES)

    def projected(self, head: nn.Module, outputs) -> Tensor:
        """`head` on the pooled feature of `outputs` (all 4B images), in fp32."""
        pooled = outputs.features["pooled"]
        with torch.autocast(pooled.device.type, enabled=False):
            return head(pooled.float().flatten(1))

    def rotation_pretext(self, student, teacher, batch, epoch) -> dict[str, Tensor]:
        """The stage's term: cross-entropy of the teacher's similarities against each rotated image's own image."""
        rows = len(batch.labels)
        similar = similarities(self.projected(self.teacher_head, teacher), rows)
        return {"sskd_pretext": F.cross_entropy(similar, own_images(rows, similar.device))}

    def forward(self, student, teacher, batch, epoch):
        rows = len(batch.labels)
        student_logits, teacher_logits = student.logits[rows:].float(), teacher.logits[rows:].float()
        labels = batch.labels.repeat(ROTATIONS - 1)
        tf = kept_kl(student_logits, teacher_logits, self.tf_temperature, kept(teacher_logits, labels, self.tf_ratio))
        student_similar = similarities(self.projected(self.student_head, student), rows)
        teacher_similar = similarities(self.projected(self.teacher_head, teacher), rows)
        keep = kept(teacher_similar, own_images(rows, labels.device), self.ss_ratio)
        ss = kept_kl(student_similar, teacher_similar, self.ss_temperature, keep)
        return {"sskd_tf": self.tf_weight * tf, "sskd_ss": self.ss_weight * ss}
