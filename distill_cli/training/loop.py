"""The training loop: it knows no KD method, only a step.

A training step is any callable `step(batch, epoch) -> (loss_parts, logits)`; `fit` runs it
under autocast, accumulates losses and accuracy on the device (one host sync per epoch), evaluates
on the validation split, appends `metrics.jsonl` and writes `last.pt` / `best.pt` atomically.
`last.pt` carries everything needed to continue the run exactly (see `fit`). `fit_together` trains
several networks on shared batches (fused sweeps).
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import BEST, save_atomic, save_last
from ..core.console import EpochProgress, log, logging_run
from ..core.errors import DistillError, Interrupted, StopSignals
from ..core.files import append_text, atomic_write
from ..core.world import SINGLE, World
from ..data.loader import Batch
from .compute import ClippingGradScaler, Compute
from .data_parallel import average_gradients
from .graphs import Branches, GraphedStep
from .metrics import evaluate
from .optim import keep_lr_kind, loss_to_backpropagate
from .rng import rng_state, set_rng_state
from .trackers import Trackers

# a training step: (batch, 1-based epoch) -> ({"loss": total, "loss/<term>": ...}, logits)
Step = Callable[[Batch, int], tuple[dict[str, torch.Tensor], torch.Tensor]]


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float | None  # None when there is no validation split (best = last)
    selection: str  # "val" (best on the validation split) or "last" (no validation split)


class EpochTotals:
    """A training epoch's running sums, kept on the device so the loop never waits for the host.

    Loss means count only steps with a finite loss (fp16 steps the GradScaler skipped); the
    non-finite ones are counted, with the index of the first, for `check_finite`.
    """

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.finite_images = torch.zeros((), device=device)
        self.bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.steps = 0  # batches done (host counters need no sync)
        self.images = 0
        self.seconds = 0.0

    def add(self, parts: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        batch = len(labels)
        finite = torch.isfinite(parts["loss"].detach())
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0) + torch.where(finite, value.detach().float() * batch, 0.0)
        self.finite_images += finite * batch
        self.bad_steps += ~finite
        self.first_bad = torch.where(~finite & (self.first_bad < 0), self.steps, self.first_bad)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.steps += 1
        self.images += batch

    def read(self, model: nn.Module, world: World = SINGLE) -> dict:
        """The totals as Python numbers, summed over the ranks of `world`, and whether `model`'s weights are
        all finite (on every rank): one host sync (and two all-reduces with several processes)."""
        weights_finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        images = torch.tensor(float(self.images), device=self.correct.device)
        # float32 holds every total exactly as kept (counts far below 2**24), and works on MPS
        added = world.sum(torch.stack([t.float() for t in (self.correct, self.finite_images, self.bad_steps, images, *self.sums.values())]))
        # the earliest bad step of any rank (none: infinity), finite weights only if finite on every rank
        first_bad = torch.where(self.first_bad < 0, math.inf, self.first_bad.float())
        least = world.min(torch.stack([first_bad, weights_finite.float()]))
        (correct, finite_images, bad_steps, images, *sums), (first_bad, weights_finite) = added.tolist(), least.tolist()
        return {
            "losses": {name: total / finite_images if finite_images else math.nan for name, total in zip(self.sums, sums)},
            "train_acc": correct / images,
            "images": int(images),
            "bad_steps": int(bad_steps),
            "first_bad": -1 if math.isinf(first_bad) else int(first_bad),
            "weights_finite": bool(weights_finite),
        }

    def state_dict(self) -> dict:
        tensors = {name: getattr(self, name).cpu() for name in ("correct", "finite_images", "bad_steps", "first_bad")}
        sums = {name: value.cpu() for name, value in self.sums.items()}
        return {**tensors, "sums": sums, "steps": self.steps, "images": self.images, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "EpochTotals":
        totals = cls(device)
        for name in ("correct", "finite_images", "bad_steps", "first_bad"):
            setattr(totals, name, state[name].to(device))
        totals.sums = {name: value.to(device) for name, value in state["sums"].items()}
        totals.steps, totals.images, totals.seconds = state["steps"], state["images"], state["seconds"]
        return totals


def check_finite(read: dict, steps: int, tolerate_bad_steps: bool, where: str, saved: str) -> None:
    """Stop a diverged run: NaN/Inf weights, or a NaN/Inf loss (with fp16 loss scaling, which skips
    such steps, only when every step of the epoch had one). `saved` says what the last checkpoint holds."""
    bad = read["bad_steps"]
    if read["weights_finite"] and (bad == 0 or (tolerate_bad_steps and bad < steps)):
        return
    if bad:
        what = f"loss NaN/Inf at step {read['first_bad'] + 1} ({bad} of {steps} steps)"
    else:
        what = f"weights NaN/Inf after step {steps}"
    raise DistillError(
        f"{where}: training diverged, {what}; stopped without saving this epoch, {saved} (a lower optimizer.lr may help)"
    )


def _write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda file: file.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def fit(
    model: nn.Module,
    step: Step,
    train_loader,
    val_loader,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    compute: Compute,
    epochs: int,
    num_classes: int,
    run_dir: Path,
    make_checkpoint: Callable[[dict], dict],
    label: str,
    resume_from: dict | None = None,
    method: nn.Module | None = None,
    trackers: Trackers | None = None,
    validate: Callable[[], dict] | None = None,
    save_best: Callable[[int, list[dict]], None] | None = None,
    cuda_graphs: str = "false",
    clip_grad_norm: float | None = None,
) -> FitResult:
    """Train for `epochs`, writing metrics.jsonl, last.pt and best.pt (best val accuracy) into `run_dir`.

    `make_checkpoint(state)` wraps the training state into a model checkpoint dict. last.pt's
    "training" holds optimizer, scheduler, GradScaler, best-so-far, every RNG state, the data order,
    the metrics so far and, mid-epoch, the epoch's partial sums; `resume_from` (such a checkpoint)
    continues the run as if it had never stopped. SIGINT/SIGTERM save last.pt at the next step
    boundary and raise Interrupted. A diverged epoch (see `check_finite`) raises before it is saved.
    `method` (a KD objective with trainable parts or buffers, trained by the same `optimizer`) is saved
    in last.pt's training state and restored with it; best.pt holds `model` alone. `trackers` (TensorBoard,
    MLflow) get each epoch once last.pt holds it.

    Several networks trained together (`model` an nn.ModuleList, as deep mutual learning does) bring
    `validate() -> {"val_acc": picks the best epoch, <more metrics of the epoch row>}` and
    `save_best(epoch, history)`, which then writes their best checkpoints in place of best.pt, at the end
    of each epoch, before last.pt.

    `cuda_graphs` ("auto" or "true": on, as `graphs.use_graphs` decided with the optimizer built graph-safe;
    "false": off) replays each step from a CUDA graph (`graphs.GraphedStep`); "true" refuses a step whose capture fails.
    `clip_grad_norm`: each step clips the gradients' global norm to it first (`compute.ClippingGradScaler`).
    """
    training = Training(
        model, step, train_loader, val_loader, optimizer=optimizer, scheduler=scheduler, compute=compute, epochs=epochs,
        num_classes=num_classes, run_dir=run_dir, make_checkpoint=make_checkpoint, label=label, resume_from=resume_from,
        method=method, trackers=trackers, validate=validate, save_best=save_best, cuda_graphs=cuda_graphs,
        clip_grad_norm=clip_grad_norm,
    )
    with training.progress as progress, StopSignals() as stop:
        for epoch in range(training.done + 1, epochs + 1):
            totals = training.begin_epoch(epoch)
            stopping = train_epoch(
                model, training.method, step, epoch, train_loader, optimizer, training.scaler, compute, progress, totals, stop,
                graphed=training.graphed,
            )
            training.end_epoch(epoch, stopping, stop.signum)
    return training.best


class Training:
    """One network's training as `fit` runs it, epoch by epoch: its optimizer, schedule, GradScaler, best
    epoch, metrics history and checkpoints. `fit` trains one; `fit_together` several on shared batches.

    Built from `fit`'s arguments; with `resume_from` it restores the checkpoint's training state (also the
    global RNG states and the loader's order: the caller keeps what several trainings need apart)."""

    def __init__(
        self, model: nn.Module, step: Step, train_loader, val_loader, *, optimizer, scheduler, compute: Compute, epochs: int,
        num_classes: int, run_dir: Path, make_checkpoint: Callable[[dict], dict], label: str, resume_from: dict | None = None,
        method: nn.Module | None = None, trackers: Trackers | None = None, validate: Callable[[], dict] | None = None,
        save_best: Callable[[int, list[dict]], None] | None = None, cuda_graphs: str = "false", clip_grad_norm: float | None = None,
    ):
        self.model, self.step, self.train_loader, self.val_loader = model, step, train_loader, val_loader
        self.optimizer, self.scheduler, self.compute, self.epochs = optimizer, scheduler, compute, epochs
        self.num_classes, self.run_dir, self.make_checkpoint, self.label = num_classes, run_dir, make_checkpoint, label
        self.validate, self.save_best = validate, save_best
        self.method = method if method is not None else nn.Module()
        self.trained = nn.ModuleList([model, self.method])  # every weight the optimizer changes
        self.progress = EpochProgress(label, epochs, len(train_loader))
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.scaler = compute.grad_scaler(clip_grad_norm)
        self.best = FitResult(best_epoch=0, best_val_acc=None, selection="val" if val_loader is not None else "last")
        self.history: list[dict] = []
        self.done, self.partial, self.saved = 0, None, "no checkpoint was written"
        self.totals: EpochTotals | None = None
        self.cuda_graphs = cuda_graphs
        self.graphed = graphed_steps([self], cuda_graphs) if cuda_graphs != "false" else None
        world = compute.world
        if resume_from is not None:
            self._resume(resume_from)
        if world.is_main:
            _write_metrics(self.metrics_path, self.history)  # lines beyond the checkpoint (if any) would be repeated
        self.trackers = trackers or Trackers({})
        self.trackers.start(self.history)

    def _resume(self, resume_from: dict) -> None:
        training, world = resume_from["training"], self.compute.world
        written_by = training.get("world_size", 1)
        if written_by != world.size:
            raise DistillError(
                f"cannot resume {self.run_dir}: last.pt was written by {written_by} training process(es), this run has "
                f"{world.size}; resume with the same number (device.processes or torchrun --nproc_per_node)"
            )
        self.model.load_state_dict(resume_from["state_dict"])
        self.method.load_state_dict(training.get("method", {}))  # format 2 (before methods had state): none
        self.optimizer.load_state_dict(training["optimizer"])
        keep_lr_kind(self.optimizer, self.graphed is not None, self.compute.device)
        self.scheduler.load_state_dict(training["scheduler"])
        self.scaler.load_state_dict(training["scaler"])
        self.train_loader.load_state_dict(training["loader"])
        # each rank's own generators and partial sums (one process: they are the training state's)
        mine = training["ranks"][world.rank] if world.distributed else training
        set_rng_state(mine["rng"])
        self.best.best_epoch, self.best.best_val_acc = training["best_epoch"], training["best_val_acc"]
        self.history, self.done = training["history"], resume_from["epoch"]
        if mine["partial"] is not None:
            self.partial = EpochTotals.from_state(mine["partial"], self.compute.device)
        position = f"epoch {self.done}" + (f" and {self.partial.steps} steps of epoch {self.done + 1}" if self.partial else "")
        self.saved = f"last.pt holds {position}"
        log.info(f"{self.label}: resuming after {position}")

    @property
    def position(self) -> tuple[int, int]:
        """(epochs done, steps done of the next epoch): where training continues."""
        return self.done, self.partial.steps if self.partial else 0

    def begin_epoch(self, epoch: int) -> EpochTotals:
        """Start 1-based `epoch` (or continue its saved part): its running totals, the bar, train mode."""
        self.totals, self.partial = self.partial or EpochTotals(self.compute.device), None
        self.progress.start_epoch(epoch, done=self.totals.steps)
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        if isinstance(self.optimizer.param_groups[0]["lr"], torch.Tensor):  # a graph-safe optimizer's float32 tensor
            self.lr = float(f"{self.lr:.7g}")
        self.method.train()
        self.model.train()
        return self.totals

    def train_step(self, batch: Batch, epoch: int) -> None:
        """One optimisation step on `batch`, added to the epoch's totals."""
        optimisation_step(self.model, self.method, self.step, batch, epoch, self.optimizer, self.scaler, self.compute, self.totals)

    def _save(self, epoch: int, val_acc: float | None, unfinished: EpochTotals | None, improved: bool) -> None:
        """Write last.pt (and best.pt when `improved`) on rank 0, with every rank's RNG states."""
        world = self.compute.world
        every_rank = world.gather({"rng": rng_state(), "partial": None if unfinished is None else unfinished.state_dict()})
        if not world.is_main:
            return
        training = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": every_rank[0]["rng"],
            "best_epoch": self.best.best_epoch,
            "best_val_acc": self.best.best_val_acc,
            "history": self.history,
            "partial": every_rank[0]["partial"],
            "method": {name: value.detach().cpu() for name, value in self.method.state_dict().items()},
            "world_size": world.size,
        }
        if world.distributed:
            training["ranks"] = every_rank
        checkpoint = self.make_checkpoint({"epoch": epoch, "val_acc": val_acc})
        if self.save_best is not None and unfinished is None:
            self.save_best(epoch, self.history)
        elif self.save_best is None and improved:
            save_atomic(checkpoint, self.run_dir / BEST)
        save_last({**checkpoint, "training": training}, self.run_dir)

    def end_epoch(self, epoch: int, stopping: bool, signum: int | None) -> None:
        """Close `epoch` after its steps: check it is finite, step the schedule, validate, append the metrics,
        save last.pt/best.pt. Stopped mid-epoch (`stopping`, by signal `signum`), save the part done and
        raise Interrupted; raises DistillError for a diverged epoch (nothing saved)."""
        totals, world, label = self.totals, self.compute.world, self.label
        read = totals.read(self.trained, world)
        check_finite(read, totals.steps * world.size, self.scaler.is_enabled(), f"{label} epoch {epoch}", self.saved)
        if stopping and totals.steps < len(self.train_loader):  # save the epoch to continue later
            self._save(epoch - 1, None, totals, improved=False)
            raise Interrupted(signum or signal.SIGTERM, f"{label} epoch {epoch} step {totals.steps}/{len(self.train_loader)}, saved to last.pt")
        self.scheduler.step()
        self.done = epoch
        if not world.is_main:  # rank 0 evaluates, logs and writes; the others only help save
            self._save(epoch, None, None, improved=False)
            if stopping:
                raise Interrupted(signum or signal.SIGTERM, f"after {label} epoch {epoch}")
            return
        if self.validate is not None:
            validation = self.validate()
        else:
            accuracy = evaluate(self.model, self.val_loader, self.compute, self.num_classes) if self.val_loader is not None else None
            validation = {"val_acc": None if accuracy is None else accuracy.overall}
        val_acc = validation["val_acc"]
        metrics = {
            "epoch": epoch,
            **read["losses"],
            "train_acc": read["train_acc"],
            **validation,
            "lr": self.lr,
            "images_per_s": read["images"] / totals.seconds,
            "seconds": totals.seconds,
        }
        self.history.append(metrics)
        append_text(self.metrics_path, json.dumps(metrics) + "\n")
        self.progress.end_epoch(metrics, list(read["losses"]))
        improved = val_acc is None or self.best.best_val_acc is None or val_acc > self.best.best_val_acc
        if improved:
            self.best.best_epoch, self.best.best_val_acc = epoch, val_acc
        self._save(epoch, val_acc, None, improved)
        self.saved = f"last.pt holds epoch {epoch}"
        self.trackers.log_epoch(metrics, epoch)
        if stopping:
            raise Interrupted(signum or signal.SIGTERM, f"after {label} epoch {epoch}, saved to last.pt")


def fit_together(trainings: list[Training], loader, streams: list[dict], stacked=None) -> list[DistillError | None]:
    """Train several networks on the same batches of `loader` (one iteration: one data order and
    augmentation per step), each as `fit` trains it alone: its own step, optimizer, schedule, metrics and
    checkpoints, and its own global RNG stream `streams[k]` (an `rng_state()`, kept up to date here),
    swapped in around everything it does, so its dropout draws are those of a run alone. Every training
    must continue from the same position. A diverged network stops alone: its DistillError is returned in
    its place (None: finished); the others go on. SIGINT/SIGTERM: each saves last.pt, then Interrupted.
    Single-process only. Each epoch's seconds are the wall time of the shared epoch.

    `stacked` (a `stacked.StackedStudents` holding the trainings' models, whose steps use its forward): the
    students' forward and backward passes run as one (`train_steps_stacked`) instead of one after another;
    their steps then draw no random numbers (stacking refuses random layers), so the streams stay as they are.

    With CUDA graphs (the trainings' `cuda_graphs`), the steps of all the running trainings on a batch are captured
    as one graph (`graphs.GraphedStep`), the teacher run once for them, each student's step (unless stacked) on its own
    CUDA stream, a branch of the graph the GPU runs beside the others (`graphs.Branches`); their random draws inside
    the step (dropout, CRD's negatives) then come from one generator, not each training's own."""
    if len({training.position for training in trainings}) > 1:
        raise DistillError(f"fused runs must continue from the same epoch and step; found {sorted({t.position for t in trainings})}")
    if trainings[0].compute.world.distributed:
        raise DistillError("fused runs train in one process (not with several processes)")
    errors: list[DistillError | None] = [None] * len(trainings)
    running = list(range(len(trainings)))
    first = trainings[0]
    graphed: dict[tuple[int, ...], GraphedStep] = {}  # the group's graph, for the trainings still running

    def as_run(k: int, action: Callable[[], None]) -> None:
        """`action()` with training k's RNG stream in place (its failure recorded, the stream kept)."""
        set_rng_state(streams[k])
        try:
            with logging_run(trainings[k].run_dir):
                action()
        except DistillError as error:
            errors[k] = error
            running.remove(k)
        finally:
            streams[k] = rng_state()

    with first.progress as progress, StopSignals() as stop:
        for epoch in range(first.done + 1, first.epochs + 1):
            for k in list(running):
                as_run(k, partial(trainings[k].begin_epoch, epoch))
            start = time.perf_counter()
            stopping = False
            for batch in loader:
                if stacked is not None:
                    stacked.keep([trainings[k].model for k in running])
                if first.cuda_graphs != "false":
                    group = [trainings[k] for k in running]
                    if tuple(running) not in graphed:  # built once per set of running trainings, not per batch
                        graphed[tuple(running)] = graphed_steps(group, first.cuda_graphs, concurrent=stacked is None)
                    replay_counted(graphed[tuple(running)], group, batch, epoch)
                elif stacked is None:
                    for k in list(running):
                        as_run(k, partial(trainings[k].train_step, batch, epoch))
                else:
                    train_steps_stacked([trainings[k] for k in running], batch, epoch)
                progress.advance()
                stopping = stop.signum is not None
                if stopping:
                    break
            seconds = time.perf_counter() - start
            interrupted = None
            for k in list(running):
                trainings[k].totals.seconds += seconds
                try:
                    as_run(k, partial(trainings[k].end_epoch, epoch, stopping, stop.signum))
                except Interrupted as stopped:
                    interrupted = stopped
            if interrupted is not None:
                raise interrupted
            if not running:
                break
    return errors


def optimisation_step(model, method, step: Step, batch: Batch, epoch: int, optimizer, scaler, compute: Compute, totals: EpochTotals) -> None:
    """One optimisation step of `step` on `batch` (gradients of the method's trainable parts averaged over
    the processes), added to `totals`."""
    parts, logits = _forward_step(step, batch, epoch, optimizer, compute)
    _backward([loss_to_backpropagate(optimizer, parts, scaler.scale)])
    _update(method, parts, logits, batch, optimizer, scaler, compute, totals)


def _forward_step(step: Step, batch: Batch, epoch: int, optimizer, compute: Compute, for_graph: bool = False):
    """The first half of a step: `step`'s terms and logits on `batch` (autocast), the gradients cleared (set to
    None; `for_graph`: zeroed in place, where a CUDA graph's backward writes them, and autocast without its cache,
    which a captured step may not keep)."""
    with compute.autocast(cache=not for_graph):
        parts, logits = step(batch, epoch)
    optimizer.zero_grad(set_to_none=not for_graph)
    return parts, logits


def _backward(losses: list[torch.Tensor | None]) -> None:
    """Backpropagate `losses` (`optim.loss_to_backpropagate` of each step; None: nothing to fill) in one pass."""
    losses = [loss for loss in losses if loss is not None]
    if losses:
        torch.autograd.backward(losses)


def _update(method, parts: dict, logits: torch.Tensor, batch: Batch, optimizer, scaler, compute: Compute, totals: EpochTotals | None) -> None:
    """The second half, once the loss has been backpropagated: the optimizer's step, added to `totals` (None: not).
    A clipping scaler's report (the norm before the clip, whether it acted) joins the step's `parts`."""
    average_gradients(method, compute.world)
    scaler.step(optimizer)
    scaler.update()
    if isinstance(scaler, ClippingGradScaler):
        parts.update(scaler.report())
    if totals is not None:
        totals.add(parts, logits, batch.labels)


def _steps_together(learners: list, batch: Batch, epoch: int, for_graph: bool = False, counted: bool = True) -> list:
    """One step of each of `learners` (each with `step`, `optimizer`, `scaler`, `method`, `compute`, `totals`) on
    `batch`: all the losses backpropagated in one pass, then each its own optimizer step; added to each one's
    totals when `counted`. Returns each one's (terms, logits)."""
    results = [_forward_step(learner.step, batch, epoch, learner.optimizer, learner.compute, for_graph) for learner in learners]
    _backward([loss_to_backpropagate(learner.optimizer, parts, learner.scaler.scale) for learner, (parts, _) in zip(learners, results)])
    for learner, (parts, logits) in zip(learners, results):
        totals = learner.totals if counted else None
        _update(learner.method, parts, logits, batch, learner.optimizer, learner.scaler, learner.compute, totals)
    return results


def _steps_on_branches(learners: list, batch: Batch, epoch: int, branches: Branches) -> list:
    """`_steps_together` as a graph runs it (`for_graph`, not counted) for students whose forward passes are their
    own (not stacked), each learner's forward, backward and optimizer step on its own branch (`graphs.Branches`): the
    first on the current stream, where its forward runs the teacher for them all; the others forked once it has run."""
    results = []
    for k, learner in enumerate(learners):
        with branches.on(k):
            parts, logits = _forward_step(learner.step, batch, epoch, learner.optimizer, learner.compute, for_graph=True)
            if k == 0:
                branches.fork()
            _backward([loss_to_backpropagate(learner.optimizer, parts, learner.scaler.scale)])
            _update(learner.method, parts, logits, batch, learner.optimizer, learner.scaler, learner.compute, None)
        results.append((parts, logits))
    branches.join()
    return results


def train_steps_stacked(learners: list, batch: Batch, epoch: int) -> None:
    """One step of each of `learners` on `batch` whose forward passes share one graph (`stacked.StackedStudents`),
    as `_steps_together` takes them."""
    _steps_together(learners, batch, epoch)


def graphed_steps(learners: list, cuda_graphs: str, capture: bool | None = None, concurrent: bool = False) -> GraphedStep:
    """The steps of `learners` (as `_steps_together` takes them) on each batch, replayed from one CUDA graph
    (`graphs.GraphedStep`; `capture` None: on CUDA); not added to their totals: the caller adds the (terms,
    logits) it returns. `cuda_graphs="true"` refuses a step whose capture fails. `concurrent` (students whose
    forward passes are their own): each learner's step on its own CUDA stream (`graphs.Branches`)."""
    device = learners[0].compute.device
    if capture is None:
        capture = device.type == "cuda"
    branches = Branches(len(learners), device) if concurrent else None

    def optimise(batch: Batch, epoch: int) -> list:
        if branches is not None:
            return _steps_on_branches(learners, batch, epoch, branches)
        return _steps_together(learners, batch, epoch, for_graph=True, counted=False)

    return GraphedStep(optimise, [learner.optimizer for learner in learners], capture, required=cuda_graphs == "true")


def replay_counted(graphed: GraphedStep, learners: list, batch: Batch, epoch: int) -> None:
    """One replayed step of `learners` (`graphed_steps` of them) on `batch`, added to each one's `totals`."""
    results, on = graphed(batch, epoch)
    for learner, (parts, logits) in zip(learners, results):
        learner.totals.add(parts, logits, on.labels)


def train_epoch(
    model, method, step: Step, epoch: int, loader, optimizer, scaler, compute: Compute, progress, totals: EpochTotals, stop,
    graphed: GraphedStep | None = None,
) -> bool:
    """Train on `loader`'s (remaining) batches of 1-based `epoch`, adding to `totals`; stops early once
    `stop.signum` is set (with several processes: on any of them, all at the same step). Returns whether
    it was stopped. The method's trainable parts have their gradients averaged over the processes
    (DistributedDataParallel does the student's). `graphed` (`graphed_steps` of this step): each step replayed
    from a CUDA graph."""
    model.train()
    world = compute.world
    start = time.perf_counter()
    stopping = False
    for batch in loader:
        if graphed is None:
            optimisation_step(model, method, step, batch, epoch, optimizer, scaler, compute, totals)
        else:
            [(parts, logits)], on = graphed(batch, epoch)
            totals.add(parts, logits, on.labels)
        progress.advance()
        stopping = world.any(stop.signum is not None)
        if stopping:
            break
    totals.seconds += time.perf_counter() - start
    return stopping


def cross_entropy_step(forward: Callable[[torch.Tensor], torch.Tensor], label_smoothing: float = 0.0) -> Step:
    """Plain supervised training (teachers, and the student trained alone), with `label_smoothing`."""

    def step(batch: Batch, epoch: int):
        logits = forward(batch.images)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels, label_smoothing=label_smoothing)
        return {"loss": loss}, logits

    return step
