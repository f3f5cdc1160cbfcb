"""The interface every KD method implements, and the objective that adds cross-entropy and Hinton KD.

    class MyMethod(Method):
        def __init__(self, weight: float = 1.0):            # hyperparameters = `loss.*` keys
            super().__init__()
            self.student_points, self.teacher_points = ("pooled",), ("pooled",)
        def setup(self, context: MethodContext) -> None:     # shapes known: build trainable parts
            self.embed = nn.Linear(context.student["pooled"][0], context.teacher["pooled"][0])
        def forward(self, student, teacher, batch, epoch):   # Outputs of both nets -> weighted terms
            return {"mine": self.weight * ...}

Feature points are named per network (`models.features.feature_points`): `stem`, `stage1`..`stageN`,
`pooled`, and `stages` (every stage). A method's parameters are trained with the student (same
optimizer), and its parameters and buffers are saved in last.pt and restored on resume; best.pt holds
the student alone. Epochs are counted from 1, as the peers count them. A method that trains something
before distillation (FT's paraphraser, AB's connectors, SSKD's teacher head) returns a `Stage` from `stage()`.
A method whose networks run on more images than the batch's (SSKD: each image's rotations too) says so in
`step_images`.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import DistillError
from ..core.world import SINGLE, World
from ..data import DatasetInfo
from ..models.features import Outputs, stage_points
from . import LOSSES, logit_methods


@dataclass
class MethodContext:
    """What a method may need to build its parts: the data and the shapes (without the batch axis)
    of the feature points it asked for, probed once on a dummy batch."""

    num_classes: int
    num_train: int  # size of the transfer set (CRD's memory banks)
    train_labels: Tensor  # (num_train,) labels of the transfer set by position, on the device
    student: dict[str, torch.Size]
    teacher: dict[str, torch.Size]
    epochs: int
    dataset: str = ""  # the dataset's name (`dataset=<name>`), for a method's messages about the data
    batch_size: int = 0  # samples per training step in each process (`batch_size`; 0: not known)
    world: World = SINGLE  # the data-parallel training processes: this one's rank among them, their collectives
    # the frozen teacher as built (BatchNorm not folded; None without a teacher), for a method that copies
    # something of it at set-up (SRD's classifier, OFD's BatchNorm statistics); a method never keeps it
    teacher_network: nn.Module | None = None
    info: DatasetInfo | None = None  # the images' shape and classes (to find the teacher's layers)


@dataclass
class Stage:
    """What a method trains before distillation (`distill kd` runs it into <run>/pretrain, resumable, once):
    `terms(student, teacher, batch, epoch)` -> its loss terms, alone, for `epochs` at the learning rate `lr`
    (None: the run's `optimizer.lr`), constant, or multiplied by the run's `optimizer.gamma` at `milestones`
    (fractions of the stage, as `optimizer.milestones`). They train the method's `parts` (frozen outside the
    stage) and, with `trains_student`, the student, whose outputs `terms` then reads (else None: the student is
    not run)."""

    epochs: int
    parts: nn.Module
    terms: Callable[[Outputs | None, Outputs, object, int], dict[str, Tensor]]
    trains_student: bool = False
    lr: float | None = None
    milestones: tuple[float, ...] = ()

    @contextmanager
    def training(self) -> Iterator[None]:
        """`parts` trainable inside, frozen again after."""
        self.parts.requires_grad_(True)
        try:
            yield
        finally:
            self.parts.requires_grad_(False)


class Method(nn.Module):
    """A KD method: weighted loss terms from the student's and teacher's `Outputs`.

    Set `student_points` / `teacher_points` in `__init__` (feature points read; empty: logits only);
    `needs_teacher` is False only for methods that use no teacher output at all; `reads_logits` is True for
    methods whose terms come from the logits (they take `loss.logit_standardization`).
    """

    needs_teacher: bool = True
    reads_logits: bool = False
    logit_standardization: bool = False  # set by `build_method` from `loss.logit_standardization`
    # the fewest samples a step's batch (in each process) needs: 2 for a method that compares the samples
    # of a batch with each other, which a batch of one leaves without a pair (refused before training)
    min_batch: int = 1
    # True for a method with a stage before distillation (`stage`): such a run trains alone, not fused
    pretrains: bool = False
    # True for a method that takes the student's stages as token sequences (N, D), a ViT's blocks, as well as maps
    token_stages: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.student_points: tuple[str, ...] = ()
        self.teacher_points: tuple[str, ...] = ()

    def setup(self, context: MethodContext) -> None:
        """Build the trainable parts and check the data, once the feature shapes are known."""

    def stage(self) -> Stage | None:
        """What the method trains before distillation, once `setup` built its parts (None: nothing)."""
        return None

    def step_images(self, images: Tensor) -> Tensor:
        """The images both networks run on in a step, from the batch's (B, C, H, W): the batch's own, which a method
        may follow with more (SSKD: their rotations). The first B rows of both networks' outputs are the batch's."""
        return images

    def planned_memory(self, context: MethodContext) -> dict[str, int]:
        """What the method will hold on the device as it trains, estimated from its hyperparameters and the
        data sizes before `setup` builds anything: bytes by what holds them, each named with the sizes that
        make it (empty: only small parts). A run whose method would not fit the free memory is refused."""
        return {}

    def forward(self, student: Outputs, teacher: Outputs | None, batch, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError


def require(ok: bool, key: str, message: str) -> None:
    """Raise a one-line DistillError naming `key` unless `ok`."""
    if not ok:
        raise DistillError(f"{key}: {message}")


def positive(key: str, value: float) -> None:
    require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")


def non_negative(key: str, value: float) -> None:
    require(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")


def stage_pairs(
    student: dict, teacher: dict, prefix: str = "stage", teacher_prefix: str | None = None
) -> list[tuple[str, str]]:
    """(student stage, teacher stage) names among the keys of `student` and `teacher` (features or their
    shapes), shallow to deep, paired from the deepest stage back: the deeper net's first stages are left
    out (pairing from the first stage would match a deep net's early stages with a shallow net's late ones).
    `prefix`: which numbered points (`preact` for the pre-activation ones); `teacher_prefix`: the teacher's,
    when they differ from the student's (default: `prefix`)."""
    teacher_stages = stage_points(teacher, teacher_prefix or prefix)
    pairs = list(zip(reversed(stage_points(student, prefix)), reversed(teacher_stages)))
    return pairs[::-1]


def match_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's height and width."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-1] > teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, in fp32 from log-softmax."""
    log_p_student = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


def one_hot_rows(labels: Tensor, classes: int) -> Tensor:
    """(B, classes) float one-hot rows of `labels`. Not F.one_hot: its check of the labels' range reads them on the
    host, which a step replayed from a CUDA graph cannot do."""
    return torch.zeros(len(labels), classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def non_target(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, C - 1): each row of `logits` without its label's column, the others in class order; gathered, not
    masked, so its shape does not depend on the values (a CUDA graph needs static shapes)."""
    rows, classes = logits.shape
    columns = torch.arange(classes - 1, device=logits.device).expand(rows, -1)
    return logits.gather(1, columns + (columns >= labels[:, None]))


def standardized(logits: Tensor) -> Tensor:
    """Each row of `logits` z-scored (Sun et al. 2024, "Logit Standardization in Knowledge Distillation"):
    minus its mean, over its standard deviation (unbiased, + 1e-7 as the authors), in fp32."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


# the key every logit method takes: z-score both networks' logits before any logit term (see `Objective`)
STANDARDIZATION_KEY = "logit_standardization"


def hyperparameters(method: type[Method]) -> dict[str, inspect.Parameter]:
    """The `loss.*` keys a method takes: its constructor's keyword arguments."""
    return {name: p for name, p in inspect.signature(method.__init__).parameters.items() if name != "self"}


def _coerce(key: str, value, annotation):
    """`value` as the annotated type (int -> float allowed), or a one-line error naming `key`."""
    kind = typing.get_origin(annotation) or annotation
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, bool, str) and type(value) is kind:
        return value
    if kind in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value)
    raise DistillError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


# the `loss.*` key of the cross-entropy's weight: read by `Objective` (see `ce_weight`), not by the method
CE_WEIGHT_KEY = "ce_weight"


def build_method(loss: dict) -> Method:
    """The method `loss["name"]` with the other `loss.*` keys as its hyperparameters (checked: unknown
    keys, types and ranges fail naming the key); `loss.ce_weight` belongs to the objective (`ce_weight`), and
    `loss.logit_standardization` (any method that reads logits; False when absent) becomes the method's
    `logit_standardization`."""
    name = loss.get("name")
    method = LOSSES.get(name)
    standardize = _coerce(f"loss.{STANDARDIZATION_KEY}", loss.get(STANDARDIZATION_KEY, False), bool)
    if standardize and not method.reads_logits:
        raise DistillError(
            f"loss.{STANDARDIZATION_KEY}: loss={name} reads no logits, there are none to standardize "
            f"(logit methods: {logit_methods()})"
        )
    accepted = hyperparameters(method)
    values = {}
    for key, value in loss.items():
        if key in ("name", CE_WEIGHT_KEY, STANDARDIZATION_KEY):
            continue
        if key not in accepted:
            raise DistillError(
                f"loss.{key}: not a hyperparameter of loss={name} (accepted: {', '.join(accepted) or 'none'})"
            )
        annotation = typing.get_type_hints(method.__init__).get(key, type(accepted[key].default))
        values[key] = _coerce(f"loss.{key}", value, annotation)
    built = method(**values)
    built.logit_standardization = standardize
    return built


def ce_weight(loss: dict, alpha: float) -> float:
    """The cross-entropy's weight: `loss.ce_weight` (>= 0) when given, else 1 - alpha (Hinton's split).
    RepDistiller's CRD+KD (CE 1, KD 1, CRD 0.8) is `loss=crd alpha=1 loss.ce_weight=1`."""
    given = loss.get(CE_WEIGHT_KEY)
    if given is None:
        return 1 - alpha
    key = f"loss.{CE_WEIGHT_KEY}"
    weight = _coerce(key, given, float)
    non_negative(key, weight)
    return weight


class Objective(nn.Module):
    """The training loss of a kd step: `ce_weight` CE (default 1 - alpha) + alpha Hinton KD at temperature T
    + the method's terms, the first two on the batch's own images (`Method.step_images`). Every term is its
    weighted contribution, named `loss/<term>`, and "loss" is their exact sum. With the method's
    `logit_standardization`, the Hinton term and the method see both networks' logits z-scored (`standardized`);
    the cross-entropy keeps the student's raw logits, and its targets are smoothed by `label_smoothing`."""

    def __init__(self, method: Method, T: float, alpha: float, ce_weight: float | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.method = method
        self.T = T
        self.alpha = alpha
        self.ce_weight = 1 - alpha if ce_weight is None else ce_weight
        self.label_smoothing = label_smoothing

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.method.needs_teacher

    @property
    def reads_teacher_features(self) -> bool:
        return bool(self.method.teacher_points)

    def forward(self, student: Outputs, teacher: Outputs | None, batch, epoch: int) -> dict[str, Tensor]:
        rows = len(batch.labels)  # the batch's own images, first among those the step showed (`Method.step_images`)
        terms: dict[str, Tensor] = {}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * F.cross_entropy(student.logits[:rows].float(), batch.labels, label_smoothing=self.label_smoothing)
        if self.method.logit_standardization:
            student = replace(student, logits=standardized(student.logits))
            teacher = teacher if teacher is None else replace(teacher, logits=standardized(teacher.logits))
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_loss(student.logits[:rows], teacher.logits[:rows], self.T)
        for name, value in self.method(student, teacher, batch, epoch).items():
            if name in terms:
                raise ValueError(f"loss term {name!r} of {type(self.method).__name__} collides with {name!r}")
            terms[name] = value.float()
        parts = {f"loss/{name}": value for name, value in terms.items()}
        return {"loss": sum(parts.values()), **parts}
