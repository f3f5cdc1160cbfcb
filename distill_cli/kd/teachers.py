"""How a kd step gets the teacher's outputs (the teacher supply): not at all, run live (frozen, BatchNorm
folded, once per batch for all the students that share it), looked up in a table of its logits computed
once (`cache_teacher=true|auto` without augmentation: every epoch shows the teacher the same images), or
looked up in a table of its logits for every augmented view of every image (`cache_teacher=views|auto`
with crop and flip: each step reads the logit of exactly the view it drew, see `data.augment.view_id`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.config import KDConfig
from ..core.errors import DistillError
from ..data import Augment
from ..data.loader import Batch, Loader
from ..models.features import Outputs
from ..training.compute import Compute
from ..training.device_memory import GIB, available_bytes, byte_size
from .objective import objective_of

NONE, LIVE, CACHED, VIEWS = "none", "live", "cached logits", "teacher views"  # the teacher supplies


def view_store_bytes(cfg: KDConfig, augment: Augment, num_images: int, num_classes: int) -> int:
    """The size of the teacher-view store: every view of every training image, `num_classes` logits each."""
    return augment.view_count * num_images * num_classes * torch.finfo(getattr(torch, cfg.teacher_views_dtype)).bits // 8


def teacher_supply(
    cfg: KDConfig, augment: Augment | None, num_images: int = 0, num_classes: int = 0, device: torch.device | None = None
) -> str:
    """How `cfg`'s kd steps get the teacher's outputs when the transfer set (`num_images` images, `num_classes`
    classes) is augmented with `augment` (None: not augmented): NONE when the objective reads no teacher
    (loss=kd alpha=0); CACHED (`cache_teacher`: auto or true) when the method reads the teacher's logits alone
    and the transfer set is not augmented (every epoch shows the teacher the same images: the lookup is
    exact); VIEWS (`cache_teacher`: views, or auto where the views can be enumerated and their store fits
    `teacher_views_max_gb` and the memory free on `device`, where it will be held; auto keeps it only where
    it pays, see `views_pay`); else LIVE. What was asked for and cannot be done exactly is refused, naming
    the reason."""
    objective = objective_of(cfg)
    if cfg.cache_teacher in ("true", "views") and objective.reads_teacher_features:
        raise DistillError(
            f"cache_teacher={cfg.cache_teacher}: loss={cfg.loss['name']} reads the teacher's features, not only its "
            "logits; only logits are cached (use cache_teacher=auto)"
        )
    if cfg.teacher_views and augment is None:
        raise DistillError(
            f"teacher_views={cfg.teacher_views}: the transfer set is not augmented, there are no views to draw; "
            "use dataset.augment=true or teacher_views=0"
        )
    if cfg.cache_teacher == "true" and augment is not None:
        raise DistillError(
            "cache_teacher=true: with dataset.augment=true each epoch shows new views, and one cached logit per "
            "image is not what the teacher says about them; use cache_teacher=views, dataset.augment=false or cache_teacher=auto"
        )
    size = view_store_bytes(cfg, augment, num_images, num_classes) if augment is not None and augment.view_count else None
    free = available_bytes(device) if device is not None and size is not None else None
    fits = size is not None and size <= cfg.teacher_views_max_gb * GIB and (free is None or size <= free)
    if cfg.cache_teacher == "views" and not fits:
        if augment is None:
            raise DistillError("cache_teacher=views: the transfer set is not augmented, one view per image; use cache_teacher=auto")
        if size is None:
            raise DistillError(
                "cache_teacher=views: colour jitter draws from a continuum of views, which cannot be enumerated; "
                "use teacher_views=K (K views per image drawn once), dataset.color_jitter=0 or cache_teacher=auto"
            )
        limit = (
            f"teacher_views_max_gb={cfg.teacher_views_max_gb:g}; raise it" if size > cfg.teacher_views_max_gb * GIB
            else f"the {byte_size(free)} free on {device}; use teacher_views=K (fewer views)"
        )
        raise DistillError(
            f"cache_teacher=views: the store of {augment.view_count} views x {num_images} images x {num_classes} "
            f"classes needs {size / GIB:.2f} GiB, over {limit}, or use teacher_views_dtype=float16 or cache_teacher=auto"
        )
    if not objective.needs_teacher:
        return NONE
    if objective.reads_teacher_features or cfg.cache_teacher == "false":
        return LIVE
    if augment is None:
        return CACHED
    return VIEWS if fits else LIVE


def views_pay(view_count: int, student_epochs: int, stored: bool) -> bool:
    """Whether a teacher-view store pays for `cache_teacher=auto`: it is stored already, or the student epochs
    trained against the teacher (a fused group's, together) run it over the transfer set at least as often
    as building the store does (once per view)."""
    return stored or student_epochs >= view_count


@torch.no_grad()
def teacher_logits(teacher: nn.Module, loader, compute: Compute, num_classes: int) -> torch.Tensor:
    """The frozen teacher's float32 logits for every image `loader` holds, indexed by position (N, classes).

    With an unaugmented loader these are what the teacher computes in a training step (the same
    frozen forward and autocast), so a kd step may look them up instead of running the teacher.
    """
    forward = compute.frozen_forward(teacher, compile=False)  # one pass: not worth compiling
    table = torch.empty(loader.num_images, num_classes, device=compute.device)
    for batch in loader:
        with compute.autocast():
            table[batch.index] = forward(batch.images).logits.float()
    return table


def run_live(forward: Callable[[torch.Tensor], Outputs]) -> Callable[[Batch], Outputs]:
    """The teacher's outputs for a batch, by running its frozen `forward`."""
    return lambda batch: forward(batch.images)


def look_up_logits(table: torch.Tensor) -> Callable[[Batch], Outputs]:
    """The teacher's logits for a batch, from `table` (one row per image of the split, `teacher_logits`)."""
    return lambda batch: Outputs(table[batch.index])


def look_up_views(store: torch.Tensor) -> Callable[[Batch], Outputs]:
    """The teacher's logits for a batch, from `store` (N, views, classes: `teacher_view_logits`) at each
    image's position and the view it drew."""
    return lambda batch: Outputs(store[batch.index, batch.view].float())


class Shared:
    """Work that kd runs on the same data with the same teacher do once for all (a fused group's jobs share
    one; a run alone has its own): results by key, made on first use."""

    def __init__(self):
        self.results: dict = {}
        self.stacked = None  # a training.stacked.StackedStudents: the students' forward passes run as one
        self.students = 1  # how many students train against the teacher together (a fused group's size)

    def once(self, key, make: Callable[[], object]):
        """The result of `key`, made by `make()` the first time it is asked for."""
        if key not in self.results:
            self.results[key] = make()
        return self.results[key]


def once_per_batch(forward: Callable) -> Callable:
    """`forward` that runs once per batch: called again with the same images tensor (the next student's
    step on the same batch), it returns the outputs it computed for them."""
    last: dict = {}

    def shared_forward(images):
        if last.get("images") is not images:
            last.update(images=images, outputs=forward(images))
        return last["outputs"]

    return shared_forward


@torch.no_grad()
def teacher_view_logits(
    teacher: nn.Module, split, loader: Loader, compute: Compute, num_classes: int, table: torch.Tensor,
    start: int = 0, chunk: int = 256, done=None,
) -> torch.Tensor:
    """Fill `table` (N, views, classes) with the frozen teacher's logits for every view of every image of
    `split` (uint8 images, made into each view and into the network's input as the training `loader` does:
    `Loader.view_of`, `Loader.normalise`), from image `start` on, `chunk` images at a time; `done(n)` is
    called after each chunk with the images done so far (to save progress). The forward pass is the one a
    kd step runs (BatchNorm folded, inference mode, the run's autocast)."""
    forward = compute.frozen_forward(teacher, compile=False)
    for first in range(start, len(split), chunk):
        last = min(first + chunk, len(split))
        if hasattr(split, "images"):
            images = split.images[first:last]
        else:  # a streamed image folder: read sample by sample
            images = torch.stack([split.image(position) for position in range(first, last)])
        images, positions = images.to(compute.device), torch.arange(first, last)
        for view in range(loader.augment.view_count):
            with compute.autocast():
                logits = forward(loader.normalise(loader.view_of(images, positions, view))).logits
            table[first:last, view] = logits.float().to(table.dtype)
        if done is not None:
            done(last)
    return table
