"""`distill bench`: images/s of our train and kd steps against a plain reference loop, in one run.

The reference is the loop the usual tutorials write: a torchvision DataLoader over PIL images with
per-sample transforms (the same crop, flip and colour-jitter augmentation), fp32, batches copied to
the device each step, and `.item()` on the loss every step. Both loops use the same architectures,
batch size and data; each is warmed up, then the two are timed in turns (distill, reference, distill, ...) so that
both see the same machine, and the medians over the repeats are reported.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import nn

from ..core.config import BenchConfig
from ..core.console import CONSOLE
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..data import Augment, DataSplits
from ..data.loader import Batch
from ..kd.teachers import CACHED, LIVE, VIEWS, Shared, teacher_supply
from ..kd.wiring import KDWiring, student_from_checkpoint, student_shaped, wire_kd
from ..losses.base import build_method
from ..models import build_model, count_parameters
from ..training.compute import Compute, device_name, synchronise
from ..training.graphs import use_graphs
from ..training.loop import (
    EpochTotals,
    cross_entropy_step,
    graphed_steps,
    optimisation_step,
    replay_counted,
    train_epoch,
    train_steps_stacked,
)
from ..training.optim import build_optimizer
from ..training.rng import seed_everything
from ..training.setup import prepare_run
from ..training.stacked import StackedStudents, why_not_stacked

log = logging.getLogger("distill")


class _NoProgress:
    def advance(self) -> None:
        pass


class _NoStop:
    signum = None


def _timed_in_turns(runs: dict[str, Callable[[int], int]], cfg: BenchConfig, compute: Compute) -> dict[str, list[float]]:
    """Warm each `run(steps) -> images` up, then time them in turns, `repeats` rounds; images/s of each."""
    for run in runs.values():
        run(cfg.warmup_steps)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(cfg.repeats):
        for name, run in runs.items():
            synchronise(compute.device)
            start = time.perf_counter()
            images = run(cfg.steps)
            synchronise(compute.device)
            rates[name].append(images / (time.perf_counter() - start))
    return rates


def _cycle(loader, steps: int):
    """`steps` batches from `loader`, starting new epochs as needed."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def _fast_runner(model: nn.Module, step, loader, cfg: BenchConfig, compute: Compute, graphs: bool) -> Callable[[int], int]:
    """distill's loop: `step` on the run's loader; `model` holds every trained weight (student and method); with
    `graphs`, each step replayed from a CUDA graph (`training.graphs`)."""
    optimizer = build_optimizer(model, cfg.optimizer, compute.device, graph_safe=graphs)
    scaler = compute.grad_scaler(cfg.optimizer.clip_grad_norm)
    graphed = graphed_steps([_Learner(model, nn.Module(), step, optimizer, scaler, compute)], cfg.device.cuda_graphs) if graphs else None

    def run(steps: int) -> int:
        totals = EpochTotals(compute.device)
        train_epoch(
            model, nn.Module(), step, 1, _cycle(loader, steps), optimizer, scaler, compute, _NoProgress(), totals, _NoStop(), graphed=graphed
        )
        totals.read(model)  # the one host sync per epoch that training also pays
        return totals.images

    return run


def _reference_loader(
    cfg: BenchConfig, data: DataSplits, augment: Augment | None
) -> tuple[torch.utils.data.DataLoader, str]:
    """The per-sample pipeline a tutorial writes for this dataset and `augment` (the run's training
    augmentation, None: off), and a line saying what it reads.

    An image folder is read the way torchvision's `ImageFolder` reads it: every sample opens and
    decodes its file (Pillow), every epoch (`reference_from_files=false`: from memory instead). Other
    datasets come as PIL images made from the decoded arrays in memory, the way torchvision's
    CIFAR/MNIST/SVHN datasets hand them out.
    """
    from PIL import Image
    from torchvision import datasets, transforms

    info = data.info
    augment = augment or Augment()
    # ImageNet-style crops are cut from the files themselves, so the reference reads them too
    from_files = cfg.dataset.name == "imagefolder" and (cfg.reference_from_files or augment.resized)
    steps: list = []
    if augment.resized:
        steps.append(transforms.RandomResizedCrop(info.image_size))
    elif from_files and cfg.dataset.image_size is not None:
        steps.append(transforms.Resize((cfg.dataset.image_size, cfg.dataset.image_size)))
    if augment.pad:
        steps.append(transforms.RandomCrop(info.image_size, padding=augment.pad))
    if augment.flip:
        steps.append(transforms.RandomHorizontalFlip())
    if augment.color_jitter:
        strength = augment.color_jitter
        steps.append(transforms.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    transform = transforms.Compose(steps)

    if from_files:
        dataset = datasets.ImageFolder(str(Path(cfg.dataset.root) / "train"), transform=transform)
        source = f"torchvision ImageFolder, {len(dataset):,} files decoded per sample"
    else:
        split = data.train

        class PILImages(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(split)

            def __getitem__(self, index: int):
                pixels = split.image(index).permute(1, 2, 0).numpy()
                return transform(Image.fromarray(pixels[..., 0] if info.channels == 1 else pixels)), int(split.labels[index])

        dataset = PILImages()
        source = "PIL images from decoded arrays in memory"
    workers = cfg.reference_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    return loader, source


def _reference_runner(model: nn.Module, step, loader, cfg: BenchConfig, device) -> Callable[[int], int]:
    """The tutorial loop: fp32, per-step host copies and `.item()` syncs; `step` computes the loss with
    plain modules (see `run_bench`)."""
    torch_default = "foreach" if device.type == "cuda" else "loop"
    optimizer = build_optimizer(model, replace(cfg.optimizer, impl=torch_default), device)
    model.train()

    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # one stream: epochs restart inside it

    def run(steps: int) -> int:
        seen = 0
        for images, labels in itertools.islice(batches, steps):
            images, labels = images.to(device), labels.to(device)
            # the reference's loader hands out no sample positions; a method reading them (CRD) gets 0
            parts, logits = step(Batch(images, labels, torch.zeros_like(labels)), 1)
            optimizer.zero_grad()
            parts["loss"].backward()
            optimizer.step()
            parts["loss"].item()
            (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        return seen

    return run


def _kd_case(cfg: BenchConfig, compute: Compute, data: DataSplits, loaders, supply: str) -> KDWiring:
    """The kd step as `distill kd` wires it (`kd.wiring.wire_kd`, the teacher supply `supply`) with an
    untrained teacher, the student from the run's seed. A teacher-view store is made of zeros: building
    the real one costs a teacher pass per view, and a kd step reads it the same whatever it holds."""
    teacher = compute.place(build_model(cfg.teacher, data.info, "teacher")).eval().requires_grad_(False)
    transfer = loaders.eval_loader(data.train) if supply == CACHED else None
    views = None
    if supply == VIEWS:
        shape = (len(data.train), loaders.train.augment.view_count, data.info.num_classes)
        views = torch.zeros(shape, dtype=getattr(torch, cfg.teacher_views_dtype), device=compute.device)
    return wire_kd(cfg, data, compute, teacher, supply=supply, transfer=transfer, views=views, seed=cfg.seed)


def _bench_header(cfg: BenchConfig, compute: Compute, data: DataSplits, loaders, teacher: nn.Module, student: nn.Module | None) -> dict:
    """What every bench.json starts with: the models, the data, the machine."""
    augment = loaders.train.augment
    return {
        "command": "bench",
        "status": "completed",
        "dataset": data.info.name,
        "teacher": {"name": cfg.teacher.label, "arch": cfg.teacher.arch, "params": count_parameters(teacher)},
        "student": {"name": cfg.student.label, "arch": cfg.student.arch, **({"params": count_parameters(student)} if student else {})},
        "loss": dict(cfg.loss),
        "batch_size": cfg.batch_size,
        "augment": asdict(augment) if augment else None,
        "device": str(compute.device),
        "device_name": device_name(compute.device),
        "threads": torch.get_num_threads(),
        "precision": compute.precision,
    }


VIEWS_ROW = "kd (teacher views)"  # the kd step reading the teacher-view store (cache_teacher=views)
STUDENT_ROW = "train (student)"  # the student's plain train step: the kd step reading the store costs this plus the loss
SWEEP_T, SWEEP_ALPHA = (2.0, 4.0, 8.0), (0.5, 0.9)  # the jobs of a timed sweep: T x alpha, in this order


def sweep_job(k: int) -> dict[str, float]:
    """T and alpha of job `k` of a timed sweep (T varies fastest, as in `distill kd -m T=2,4,8 alpha=0.5,0.9`)."""
    return {"T": SWEEP_T[k % len(SWEEP_T)], "alpha": SWEEP_ALPHA[k // len(SWEEP_T) % len(SWEEP_ALPHA)]}


@dataclass
class _Learner:
    """One student of a timed sweep, with what `training.loop.optimisation_step` and `train_steps_stacked` take."""

    trained: nn.Module  # the student and its objective's parts
    method: nn.Module
    step: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compute: Compute
    totals: EpochTotals | None = None


def _sweep_learners(
    cfg: BenchConfig, compute: Compute, data: DataSplits, teacher: nn.Module, share_teacher: bool, graphs: bool, stacked=None
) -> list[_Learner]:
    """The `cfg.fused` students of a T x alpha sweep as `distill kd` wires each (`kd.wiring.wire_kd`), from
    the run's seed; the teacher runs every step, once per batch for them all with `share_teacher` (a fused
    group), and `stacked` (a `StackedStudents`) makes their forward passes one; `graphs`: optimizers a CUDA graph
    can replay."""
    shared = Shared() if share_teacher else None
    learners = []
    for k in range(cfg.fused):
        job = replace(cfg, **sweep_job(k))
        wired = wire_kd(job, data, compute, teacher, shared=shared, seed=cfg.seed if k == 0 else None, stacked=stacked)
        optimizer = build_optimizer(wired.trained, cfg.optimizer, compute.device, graph_safe=graphs)
        learners.append(_Learner(wired.trained, wired.objective, wired.step, optimizer, compute.grad_scaler(cfg.optimizer.clip_grad_norm), compute))
    return learners


def _sweep_runner(learners: list[_Learner], loader, how: str, cuda_graphs: str | None) -> Callable[[int], int]:
    """`steps` kd steps of every learner: "serial" (each job its own pass over the loader and its own teacher
    forward), "fused" (one pass, the students one after another), "streams" (one pass, each student's step on its
    own CUDA stream) or "stacked" (one pass, one stacked step). `cuda_graphs` (the setting, None: off): each job's
    steps (serial), or the group's (fused, streams, stacked), replayed from one CUDA graph."""

    def train(learner: _Learner, batch) -> None:
        optimisation_step(None, learner.method, learner.step, batch, 1, learner.optimizer, learner.scaler, learner.compute, learner.totals)

    graphed = None
    if cuda_graphs is not None:
        if how == "serial":
            graphed = [graphed_steps([learner], cuda_graphs) for learner in learners]
        else:
            graphed = [graphed_steps(learners, cuda_graphs, concurrent=how == "streams")]

    def run(steps: int) -> int:
        for learner in learners:
            learner.totals = EpochTotals(learner.compute.device)
        if graphed is not None:
            for step, group in zip(graphed, [[learner] for learner in learners] if how == "serial" else [learners]):
                for batch in _cycle(loader, steps):
                    replay_counted(step, group, batch, 1)
        elif how == "serial":
            for learner in learners:
                for batch in _cycle(loader, steps):
                    train(learner, batch)
        elif how == "stacked":
            for batch in _cycle(loader, steps):
                train_steps_stacked(learners, batch, 1)
        else:
            for batch in _cycle(loader, steps):
                for learner in learners:
                    train(learner, batch)
        for learner in learners:
            learner.totals.read(learner.trained)  # each job's one host sync per epoch
        return sum(learner.totals.images for learner in learners)

    return run


def run_sweep_bench(cfg: BenchConfig, run_dir: Path) -> dict:
    """`distill bench fused=K`: the kd steps of a K-job T x alpha sweep timed in turns: one job after another (each
    with its own data pass and teacher forward), fused with the students one after another, with CUDA graphs fused
    with each student on its own CUDA stream (as `distill kd -m` trains a group), and fused with the students
    stacked (when they can stack: `stacked.why_not_stacked`). Untrained teacher; the
    teacher runs on every step, as it does with augmentation. Writes bench.json, prints the table."""
    compute, data, loaders = prepare_run(cfg)
    graphs = use_graphs(cfg.device.cuda_graphs, compute, cfg.optimizer, "bench")
    seed_everything(cfg.seed)
    teacher = compute.place(build_model(cfg.teacher, data.info, "teacher"))
    cases = {
        "serial": _sweep_learners(cfg, compute, data, teacher, share_teacher=False, graphs=graphs),
        "fused": _sweep_learners(cfg, compute, data, teacher, share_teacher=True, graphs=graphs),
    }
    if graphs:
        cases["streams"] = _sweep_learners(cfg, compute, data, teacher, share_teacher=True, graphs=graphs)
    points = build_method(dict(cfg.loss)).student_points
    not_stacked = why_not_stacked([student_shaped(cfg.student, data, compute) for _ in range(cfg.fused)], points, compute)
    if not_stacked is None:
        cases["stacked"] = _sweep_learners(cfg, compute, data, teacher, share_teacher=True, graphs=graphs, stacked=StackedStudents())
    setting = cfg.device.cuda_graphs if graphs else None
    rates = _timed_in_turns({how: _sweep_runner(learners, loaders.train, how, setting) for how, learners in cases.items()}, cfg, compute)
    serial = statistics.median(rates["serial"])
    rows = {
        how: {"images_per_s": statistics.median(repeats), "time_vs_serial": serial / statistics.median(repeats), "repeats": repeats}
        for how, repeats in rates.items()
    }
    result = {
        **_bench_header(cfg, compute, data, loaders, teacher, student=None),
        "case": "fused sweep",
        "jobs": [sweep_job(k) for k in range(cfg.fused)],
        "not_stacked": not_stacked,
        "cuda_graphs": graphs,
        "steps": cfg.steps,
        "repeats": cfg.repeats,
        "results": rows,
    }
    write_json_atomic(result, run_dir / "bench.json")
    CONSOLE.print(sweep_bench_table(result))
    return result


SWEEP_ROWS = {
    "serial": "one job after another",
    "fused": "fused, students one after another",
    "streams": "fused, students on their own CUDA streams",
    "stacked": "fused, students stacked",
}


def sweep_bench_table(result: dict) -> Group:
    """The fused-sweep results: student images/s of all jobs together and time relative to serial jobs."""
    jobs = len(result["jobs"])
    table = Table(title=f"distill bench fused={jobs}: {result['dataset']}, {result['teacher']['name']} -> {result['student']['name']}, "
                  f"batch {result['batch_size']}, median of {result['repeats']} x {result['steps']} steps per job")
    for column in ("sweep of T x alpha", "student img/s (all jobs)", "time vs one job after another"):
        table.add_column(column, justify="left" if column.startswith("sweep") else "right")
    for how, row in result["results"].items():
        table.add_row(SWEEP_ROWS[how], f"{row['images_per_s']:,.0f}", f"{row['time_vs_serial']:.2f}x")
    notes = [
        (
            f"machine: {result['device']} ({result['device_name']}, {result['threads']} threads), {result['precision']}, "
            f"CUDA graphs {'on' if result.get('cuda_graphs') else 'off'}"
        ),
        f"augmentation: {_describe_augment(result['augment'])}; the (untrained) teacher runs on every step",
    ]
    if result["not_stacked"]:
        notes.append(f"not stacked: {result['not_stacked']}")
    return Group(table, *(Text(note) for note in notes))


def run_bench(cfg: BenchConfig, run_dir: Path) -> dict:
    """Time a train step (teacher, CE) and a kd step (student from a frozen teacher, the method of
    `cfg.loss`), fast vs reference.

    Each loop gets its own freshly built models: ours placed as a run places them (channels_last,
    compiled with device.compile, BatchNorm folded into the frozen teacher, cached teacher logits when
    exact), the reference's as a tutorial would (plain fp32 NCHW modules, the teacher run as it is), with
    the same loss computation.
    """
    if cfg.device.processes > 1:
        raise DistillError(
            "device.processes: distill bench times one process; the images/s of a data-parallel run are in its metrics.jsonl"
        )
    cfg = student_from_checkpoint(cfg)
    if cfg.fused:
        return run_sweep_bench(cfg, run_dir)
    compute, data, loaders = prepare_run(cfg)
    graphs = use_graphs(cfg.device.cuda_graphs, compute, cfg.optimizer, "bench")
    plain = Compute(compute.device, "fp32", channels_last=False, fold_frozen=False)
    seed_everything(cfg.seed)
    teacher = compute.place(build_model(cfg.teacher, data.info, "teacher"))
    supply = teacher_supply(cfg, loaders.train.augment, len(data.train), data.info.num_classes, compute.device)
    # the kd step as it runs when the teacher runs (or its logits are cached, without augmentation), and,
    # where the views can be stored, as it runs reading the teacher-view store
    kd_fast = _kd_case(cfg, compute, data, loaders, LIVE if supply == VIEWS else supply)
    student = kd_fast.student
    seed_everything(cfg.seed)
    reference_teacher = plain.place(build_model(cfg.teacher, data.info, "teacher"))
    kd_reference = _kd_case(cfg, plain, data, loaders, LIVE if supply in (CACHED, VIEWS) else supply)  # a tutorial runs the teacher
    reference, reference_source = _reference_loader(cfg, data, loaders.train.augment)
    cases = {
        "train": (
            (teacher, cross_entropy_step(compute.forward(teacher))),
            (reference_teacher, cross_entropy_step(plain.forward(reference_teacher))),
        ),
        "kd": ((kd_fast.trained, kd_fast.step), (kd_reference.trained, kd_reference.step)),
    }
    if supply == VIEWS:  # the kd step without the teacher, and what it is compared with: the student alone
        kd_views = _kd_case(cfg, compute, data, loaders, VIEWS)
        cases[VIEWS_ROW] = ((kd_views.trained, kd_views.step), (kd_reference.trained, kd_reference.step))
        alone, reference_alone = (student_shaped(cfg.student, data, where) for where in (compute, plain))
        cases[STUDENT_ROW] = (
            (alone, cross_entropy_step(compute.forward(alone))),
            (reference_alone, cross_entropy_step(plain.forward(reference_alone))),
        )
    rows = {}
    for name, ((model, step), (reference_model, reference_step)) in cases.items():
        runs = {
            "distill": _fast_runner(model, step, loaders.train, cfg, compute, graphs),
            "reference": _reference_runner(reference_model, reference_step, reference, cfg, compute.device),
        }
        rates = _timed_in_turns(runs, cfg, compute)
        fast, slow = statistics.median(rates["distill"]), statistics.median(rates["reference"])
        rows[name] = {
            "distill_images_per_s": fast,
            "reference_images_per_s": slow,
            "speedup": fast / slow,
            "distill_repeats": rates["distill"],
            "reference_repeats": rates["reference"],
        }
    result = {
        **_bench_header(cfg, compute, data, loaders, teacher, student),
        "T": cfg.T,
        "alpha": cfg.alpha,
        "pipeline": loaders.pipeline,
        "channels_last": {"teacher": compute.uses_channels_last(teacher), "student": compute.uses_channels_last(student)},
        "compile": compute.compile,
        "cuda_graphs": graphs,
        "optimizer_impl": cfg.optimizer.impl,
        "teacher_logits_cached": kd_fast.supply == CACHED,
        "reference_workers": cfg.reference_workers,
        "reference_data": reference_source,
        "steps": cfg.steps,
        "repeats": cfg.repeats,
        "results": rows,
    }
    write_json_atomic(result, run_dir / "bench.json")
    CONSOLE.print(bench_table(result))
    return result


def bench_table(result: dict) -> Group:
    """The results table, with the machine and the settings of both loops underneath."""
    table = Table(title=f"distill bench: {result['dataset']}, batch {result['batch_size']}, median of {result['repeats']}")
    for column in ("step", "distill img/s", "reference img/s", "speed-up"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for name, row in result["results"].items():
        if name == "kd" and result["teacher_logits_cached"]:
            name = "kd (teacher logits cached)"
        table.add_row(
            name, f"{row['distill_images_per_s']:,.0f}", f"{row['reference_images_per_s']:,.0f}", f"{row['speedup']:.2f}x"
        )
    on_off = lambda flag: "on" if flag else "off"  # noqa: E731
    notes = [
        f"machine: {result['device']} ({result['device_name']}, {result['threads']} threads)",
        f"distill: {result['precision']}, {result['pipeline']} pipeline, channels_last teacher "
        f"{on_off(result['channels_last']['teacher'])} / student {on_off(result['channels_last']['student'])}, "
        f"compile {on_off(result['compile'])}, CUDA graphs {on_off(result.get('cuda_graphs'))}, optimizer {result['optimizer_impl']}",
        f"reference: fp32, DataLoader with {result['reference_workers']} workers, PIL transforms, .item() every step; "
        f"reads {result['reference_data']}",
        f"augmentation (both): {_describe_augment(result['augment'])}",
    ]
    return Group(table, *(Text(note) for note in notes))


def _describe_augment(augment: dict | None) -> str:
    if augment is None:
        return "off"
    parts = ["random-resized crop"] if augment["resized"] else []
    if augment["pad"]:
        parts.append(f"crop with padding {augment['pad']}")
    if augment["flip"]:
        parts.append("flip")
    if augment["color_jitter"]:
        parts.append(f"colour jitter {augment['color_jitter']:g}")
    return ", ".join(parts)
