"""`distill eval <run folder or checkpoint>`: the numbers a deployment decision needs.

Quality on the test split (accuracy overall and per class, confusion matrix, expected calibration
error), cost (parameters, bytes on disk, multiply-adds per image counted by torch's FlopCounterMode,
peak activation memory of a forward pass) and speed (batch-1 latency, throughput at a large batch) on
the CPU and, when present, the GPU. A kd run folder gives teacher, student and student alone in one table
(mutual learning: each peer and peer alone; born-again networks: each generation); a `.pt2` program of
`distill quantize` (int8) or `distill export` is measured as saved. `distill export`, `distill quantize`
and the kd summary's speed-up (`throughputs`) reuse the loading, prediction and measurement functions here.
"""

from __future__ import annotations

import io
import json
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..core.checkpoint import BEST, load_checkpoint
from ..core.config import SYNTHETIC_ONLY, RunConfig, validate_config
from ..core.console import CONSOLE, library_log
from ..core.errors import DistillError
from ..core.files import atomic_write, write_json_atomic
from ..data import DatasetInfo
from ..models import count_parameters
from ..models.checkpoints import model_from_checkpoint
from ..models.fold import fold_batch_norm
from ..training.compute import Compute, device_name, synchronise
from ..training.metrics import TOP5_FROM_CLASSES, top5_hits
from ..training.setup import prepare_run
from .programs import distill_record, load_program, program_forward

ECE_BINS = 15


@dataclass
class Subject:
    """What a ship command works on: the run's config and the (role, checkpoint) pairs to load."""

    config: RunConfig
    checkpoints: list[tuple[str, Path]]
    folder: Path  # the run folder, or the folder holding the checkpoint


def _run_config(config: dict, overrides: list[str], source: Path) -> RunConfig:
    """The run's recorded config with `overrides` (key=value) merged on, validated; fp32 on the CPU unless overridden."""
    command = "kd" if "student" in config else "train"
    dataset = config.get("dataset") or {}
    if dataset.get("name") != "synthetic":  # runs recorded before these keys became synthetic-only
        config = {**config, "dataset": {k: v for k, v in dataset.items() if k not in SYNTHETIC_ONLY}}
    try:
        merged = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(overrides))
    except Exception as error:
        raise DistillError(f"{source}: cannot apply {' '.join(overrides)} ({str(error).splitlines()[0]})") from None
    cfg = validate_config(command, merged)
    if not any(o.startswith("device.type=") for o in overrides):
        cfg.device.type = "cpu"  # accuracy on the CPU; timings add the GPU themselves (gpu=true)
    cfg.device.precision = "fp32"
    return cfg


def _partner(folder: Path, recorded: dict | None) -> Path | None:
    """The best.pt of a network a kd run compares with (its teacher, a student alone): in its sub-folder
    `folder` when it trained there, else the checkpoint its summary entry `recorded` names (the cache)."""
    if (folder / BEST).is_file():
        return folder / BEST
    checkpoint = (recorded or {}).get("checkpoint")
    return Path(checkpoint) if checkpoint and Path(checkpoint).is_file() else None


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def run_models(run_dir: Path, config: dict) -> tuple[Path | None, list[tuple[str, Path]], list[tuple[str, Path | None]]]:
    """The networks of a run folder: the teacher's best.pt (None: none, or not found), the (role, best.pt)
    of each network the run trained, and of each one trained alone (None: not found). A train run: its
    model. A kd run: its student, teacher and student alone; mutual learning (`peers=`): each peer
    (`<run>/peer<i>/`) and each peer alone; born-again networks (`generations=`): each generation
    (`<run>/gen<k>/`), with generation 1's teacher and student alone."""
    summary = _summary(run_dir)
    if "student" not in config:
        return None, [("teacher", run_dir / BEST)], []
    if config.get("peers"):
        labels = [f"peer{i}" for i in range(1, len(config["peers"]) + 1)]
        rows = summary.get("peers") or [{} for _ in labels]
        alone = [(f"{label} alone", _partner(run_dir / f"baseline{i}", row.get("baseline"))) for i, (label, row) in enumerate(zip(labels, rows), 1)]
        return None, [(label, run_dir / label / BEST) for label in labels], alone
    if (config.get("generations") or 1) > 1:
        first, summary = run_dir / "gen1", _summary(run_dir / "gen1")
        generations = [(f"generation {k}", run_dir / f"gen{k}" / BEST) for k in range(1, config["generations"] + 1)]
        return _partner(first / "teacher", summary.get("teacher")), generations, [("student alone", _partner(first / "baseline", summary.get("baseline")))]
    alone = [("student alone", _partner(run_dir / "baseline", summary.get("baseline")))]
    return _partner(run_dir / "teacher", summary.get("teacher")), [("student", run_dir / BEST)], alone


def subject_folder(path: Path) -> Path:
    """The run folder, or the folder holding the checkpoint or program."""
    return path if path.is_dir() else path.parent


def subject(path: str | Path, overrides: list[str]) -> Subject:
    """A run folder (its `.hydra/config.yaml`; the networks of `run_models`, teacher first), one checkpoint,
    or a program (`.pt2`, see `ship.programs`): the config to rebuild its data with and the models to measure."""
    path = Path(path)
    if path.suffix == ".pt2" and path.is_file():
        record = distill_record(path)
        return Subject(_run_config(record["config"], overrides, path), [(record["precision"], path)], path.parent)
    if not path.is_dir():
        checkpoint = load_checkpoint(path)
        return Subject(_run_config(checkpoint.get("config") or {}, overrides, path), [("model", path)], path.parent)
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise DistillError(f"{path} is not a distill run folder (no .hydra/config.yaml and best.pt)")
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DistillError(f"{config_file}: cannot read it ({type(error).__name__})") from None
    teacher, trained, alone = run_models(path, config)
    trained = [(role, checkpoint) for role, checkpoint in trained if checkpoint.is_file()]
    if not trained:
        raise DistillError(f"{path} is not a distill run folder (no .hydra/config.yaml and best.pt)")
    checkpoints = ([("teacher", teacher)] if teacher else []) + trained + [(role, checkpoint) for role, checkpoint in alone if checkpoint]
    return Subject(_run_config(config, overrides, path), checkpoints, path)


@torch.inference_mode()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], loader) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (on the CPU) of `forward` over every batch of `loader`, and the labels."""
    logits, labels = [], []
    for batch in loader:
        logits.append(torch.as_tensor(forward(batch.images)).float().cpu())
        labels.append(batch.labels.cpu())
    return torch.cat(logits), torch.cat(labels)


def calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    confidence, predicted = probabilities.max(1)
    hits = (predicted == labels).float()
    which = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    gap = torch.bincount(which, hits - confidence, minlength=bins).abs()
    return (gap.sum() / count.sum()).item()


def quality(logits: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...]) -> dict:
    """Accuracy overall and per class (top-5 too from TOP5_FROM_CLASSES classes), the confusion matrix (rows: true
    class, columns: predicted) and the ECE."""
    n = len(class_names)
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    top5 = top5_hits(logits, labels).float().mean().item() if n >= TOP5_FROM_CLASSES else None
    return {
        "test_acc": (predicted == labels).float().mean().item(),
        **({} if top5 is None else {"test_acc_top5": top5}),
        "test_acc_per_class": dict(zip(class_names, per_class.tolist())),
        "ece": calibration_error(logits.softmax(1), labels),
        "confusion": confusion.tolist(),
    }


def serialized_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of `tensors` as torch.save writes them."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def flops_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image as FlopCounterMode counts them: 2 per multiply-add of the
    convolutions and matrix products (normalisation, activations and pooling are not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(image[:1])
    return counter.get_total_flops()


class _LiveMemory(TorchDispatchMode):
    """Tracks the bytes held by the tensors the operators create, freed as they die; keeps the peak."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # views of these are not new memory
        self.references: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if not address or address in self.existing:
            return
        if address not in self.references:
            self.references[address], self.sizes[address] = 0, storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.references[address] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        self.references[address] -= 1
        if not self.references[address]:
            del self.references[address]
            self.current -= self.sizes.pop(address)


@torch.inference_mode()
def peak_activation_bytes(model: nn.Module, image: torch.Tensor) -> int:
    """Peak bytes of the tensors alive at once during a batch-1 forward pass on the CPU, counting every
    tensor an operator returns until it is freed (activations; not the weights, not the input image)."""
    image = image[:1].cpu().clone()
    tracker = _LiveMemory([image, *model.parameters(), *model.buffers()])
    with tracker:
        model(image)
    return tracker.peak


@dataclass
class Timing:
    """How latency and throughput are measured: `calls` timed batch-1 calls after `warmup`, and the
    median of `repeats` timed calls at batch `batch`."""

    calls: int = 200
    warmup: int = 20
    batch: int = 256
    repeats: int = 10


def timed_turns(forwards: list[Callable[[torch.Tensor], object]], images: torch.Tensor, device: torch.device, warmup: int, rounds: int) -> list[list[float]]:
    """Seconds of each timed call of each forward on `images`: `warmup` untimed calls of each, then `rounds`
    rounds in which each forward is called once, in turn, so that load coming and going on the machine
    falls on all of them alike."""
    for forward in forwards:
        for _ in range(warmup):
            forward(images)
    synchronise(device)
    seconds = [[] for _ in forwards]
    for _ in range(rounds):
        for forward, times in zip(forwards, seconds):
            start = time.perf_counter()
            forward(images)
            synchronise(device)
            times.append(time.perf_counter() - start)
    return seconds


def fixed_batch(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """A batch of `size` images on `device`: `images` repeated to fill it."""
    return images.repeat(-(-size // len(images)), 1, 1, 1)[:size].to(device)


@torch.inference_mode()
def speeds(forwards: list[Callable[[torch.Tensor], object]], images: torch.Tensor, device: torch.device, timing: Timing, precisions: list[str]) -> list[dict]:
    """Batch-1 latency (median and p90, ms) and throughput (images/s at batch `timing.batch`) of each of
    `forwards` on real `images` (repeated to fill the batch), on `device`, the forwards timed in turns
    (`timed_turns`) so that their ratios hold still; with the thread count and device named."""
    batch = fixed_batch(images, timing.batch, device)
    latencies = timed_turns(forwards, batch[:1].clone(), device, timing.warmup, timing.calls)
    seconds = timed_turns(forwards, batch, device, 1, timing.repeats)
    return [
        {
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "precision": precision,
            "latency_ms_median": 1e3 * statistics.median(ms),
            "latency_ms_p90": 1e3 * statistics.quantiles(ms, n=10)[-1],
            "throughput_images_per_s": len(batch) / statistics.median(times),
            "throughput_batch": len(batch),
        }
        for ms, times, precision in zip(latencies, seconds, precisions)
    ]


def deployed(model: nn.Module, compute: Compute) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` as deployed: a copy in eval mode with BatchNorm folded, on `compute`'s device in its memory
    format, run under its precision (autocast)."""
    forward = compute.forward(compute.place(fold_batch_norm(model)), compile=False)

    def run(images: torch.Tensor) -> torch.Tensor:
        with compute.autocast():
            return forward(images)

    return run


def throughputs(models: list[nn.Module], images: torch.Tensor, compute: Compute, timing: Timing) -> list[float]:
    """Images/s of each of `models` as deployed (`deployed`) at batch `timing.batch` of real `images`: the
    median of `timing.repeats` rounds in which each model runs once in turn, after `timing.warmup` calls of
    each. Timed in turns, their ratio holds still when the machine's load changes."""
    batch = fixed_batch(images, timing.batch, compute.device)
    forwards = [deployed(model, compute) for model in models]
    with torch.inference_mode():
        seconds = timed_turns(forwards, batch, compute.device, timing.warmup, timing.repeats)
    return [len(batch) / statistics.median(times) for times in seconds]


def timing_devices(gpu: bool) -> list[torch.device]:
    """The CPU and, with `gpu` and CUDA present, the GPU."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if gpu and torch.cuda.is_available() else [])


@dataclass
class Measured:
    """A model's row of `distill eval` before it is timed, and how it runs on each timing device."""

    row: dict
    forwards: dict[str, Callable[[torch.Tensor], object]]  # device type -> the model's forward there
    precision: str = "fp32"


def timed(measured: list[Measured], images: torch.Tensor, timing: Timing) -> list[dict]:
    """The rows of `measured`, each with its `speed` on each device it runs on, all models timed in turns
    there (`speeds`); where the first row is the teacher, each row's throughput over the teacher's
    (`speedup`)."""
    for device in dict.fromkeys(kind for one in measured for kind in one.forwards):
        runs = [one for one in measured if device in one.forwards]
        results = speeds([one.forwards[device] for one in runs], images, torch.device(device), timing, [one.precision for one in runs])
        for one, result in zip(runs, results):
            one.row.setdefault("speed", {})[device] = result
    teacher = measured[0].row["speed"] if measured[0].row["role"] == "teacher" else {}
    for one in measured:
        for device, result in one.row["speed"].items():
            if device in teacher:
                result["speedup"] = result["throughput_images_per_s"] / teacher[device]["throughput_images_per_s"]
    return [one.row for one in measured]


def first_images(loader, count: int) -> torch.Tensor:
    """The first `count` normalised images of `loader`, float32 NCHW on the CPU."""
    images = []
    for batch in loader:
        images.append(batch.images.float().cpu().contiguous())
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count]


def measure(role: str, name: str, checkpoint: Path, model: nn.Module, loader, info: DatasetInfo, compute: Compute, timing: Timing, gpu: bool) -> Measured:
    """Everything `distill eval` reports about one fp32 model but its speed (see `timed`): as deployed (`deployed`,
    fp32, the run's memory format) on each timing device."""
    logits, labels = predict(compute.forward(compute.place(model), compile=False), loader)
    model = model.cpu()
    images = first_images(loader, timing.batch)
    flops = flops_per_image(model, images)
    row = {
        "role": role,
        "name": name,
        "checkpoint": str(checkpoint),
        **quality(logits, labels, info.class_names),
        "params": count_parameters(model),
        "size_bytes": serialized_bytes(model.state_dict()),
        "flops": flops,
        "macs": flops // 2,
        "peak_activation_bytes": peak_activation_bytes(model, images),
    }
    devices = timing_devices(gpu)
    return Measured(row, {device.type: deployed(model, Compute(device, "fp32", channels_last=compute.channels_last)) for device in devices})


def measure_program(role: str, path: Path, loader, info: DatasetInfo) -> Measured:
    """Everything `distill eval` reports about a program (`ship.programs`) but its speed, on the CPU; an int8 one
    compiled by Inductor as `distill quantize` timed it. Its size is the file's; its activation memory is
    not measured (an eager run of an int8 program holds float tensors the compiled one does not)."""
    record, module = distill_record(path), load_program(path)
    if record["num_classes"] != info.num_classes:
        raise DistillError(f"{path} predicts {record['num_classes']} classes, but {info.name} has {info.num_classes}")
    forward = program_forward(path, module, record)
    logits, labels = predict(forward, loader)
    flops = flops_per_image(module, first_images(loader, 1))
    row = {
        "role": role,
        "name": record["name"],
        "checkpoint": str(path),
        **quality(logits, labels, info.class_names),
        "params": record["params"],
        "size_bytes": path.stat().st_size,
        "flops": flops,
        "macs": flops // 2,
        "peak_activation_bytes": None,
    }
    return Measured(row, {"cpu": forward}, record["precision"])


def measure_file(role: str, path: Path, loader, info: DatasetInfo, compute: Compute, timing: Timing, gpu: bool) -> Measured:
    """`measure` of a checkpoint's model, or `measure_program` of a program."""
    if path.suffix == ".pt2":
        return measure_program(role, path, loader, info)
    model, name = model_from_checkpoint(path, info)
    return measure(role, name, path, model, loader, info, compute, timing, gpu)


def run_eval(path: str | Path, overrides: list[str], out: str | None = None, gpu: bool = True, timing: Timing = Timing()) -> dict:
    """`distill eval`: measure each model of the run folder (or the one checkpoint or program); write eval.json
    and confusion.png into `out` (default: `<run folder>/eval`), torch's own warnings into eval.log there,
    and print the table."""
    folder = Path(out) if out else subject_folder(Path(path)) / "eval"
    with library_log(folder / "eval.log") as logged:
        sub = subject(path, overrides)
        compute, data, loaders = prepare_run(sub.config)
        measured = [measure_file(role, checkpoint, loaders.test, data.info, compute, timing, gpu) for role, checkpoint in sub.checkpoints]
        rows = timed(measured, first_images(loaders.test, timing.batch), timing)
    result = {
        "command": "eval",
        "dataset": data.info.name,
        "test_images": len(data.test),
        "class_names": list(data.info.class_names),
        "timing": timing.__dict__,
        "models": rows,
    }
    write_json_atomic(result, folder / "eval.json")
    save_confusion(rows, data.info.class_names, folder / "confusion.png")
    CONSOLE.print(eval_table(result))
    CONSOLE.print(f"wrote {folder / 'eval.json'} and {folder / 'confusion.png'}{logged.mention()}")
    return result


def save_confusion(rows: list[dict], class_names, path: Path) -> None:
    """One confusion-matrix heatmap per model, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.6 + 0.45 * len(class_names)
    figure, axes = plt.subplots(1, len(rows), figsize=(size * len(rows), size), squeeze=False)
    for axis, row in zip(axes[0], rows):
        confusion = torch.tensor(row["confusion"]).numpy()
        axis.imshow(confusion, cmap="Blues")
        for (i, j), value in zip(((i, j) for i in range(len(class_names)) for j in range(len(class_names))), confusion.flatten().tolist()):
            axis.text(j, i, value, ha="center", va="center", fontsize=6, color="white" if value > confusion.max() / 2 else "black")
        axis.set_title(f"{row['role']}: {row['name']}\naccuracy {row['test_acc']:.2%}", fontsize=8)
        axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=6)
        axis.set_yticks(range(len(class_names)), class_names, fontsize=6)
        axis.set_xlabel("predicted", fontsize=7)
        axis.set_ylabel("true", fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def eval_table(result: dict) -> Group:
    """One row per model: accuracy, ECE, cost and speed on each timed device; the methods underneath."""
    rows = result["models"]
    devices = list(rows[0]["speed"])
    table = Table(title=f"distill eval: {result['dataset']}, {result['test_images']:,} test images")
    columns = ["role", "model", "test acc", "ECE", "params", "size", "MMACs/img", "act. mem"]
    speedup = "speedup" in rows[0]["speed"][devices[0]]  # timed against a teacher (`timed`)
    for device in devices:
        columns += [f"{device} b1 ms (p90)", f"{device} img/s", *([f"{device} speed-up"] if speedup else [])]
    for column in columns:
        table.add_column(column, justify="left" if column in ("role", "model") else "right")
    for row in rows:
        cells = [
            row["role"], row["name"], f"{row['test_acc']:.2%}" + (f" (top-5 {row['test_acc_top5']:.2%})" if "test_acc_top5" in row else ""),
            f"{row['ece']:.3f}", f"{row['params']:,}", human_bytes(row["size_bytes"]), f"{row['macs'] / 1e6:.2f}",
            human_bytes(row["peak_activation_bytes"]),
        ]
        for device in devices:
            timed_here = row["speed"].get(device)
            cells += ["-"] * (2 + speedup) if timed_here is None else [
                f"{timed_here['latency_ms_median']:.3f} ({timed_here['latency_ms_p90']:.3f})",
                f"{timed_here['throughput_images_per_s']:,.0f}", *([f"{timed_here['speedup']:.2f}x"] if speedup else []),
            ]
        table.add_row(*cells)
    program = rows[0]["peak_activation_bytes"] is None  # a .pt2 file (`measure_program`)
    notes = [
        "MMACs/img: millions of multiply-adds per image = FlopCounterMode FLOPs / 2 (convolutions and matrix "
        "products only); act. mem: peak bytes of the tensors a batch-1 forward holds at once (CPU)",
        "ECE: expected calibration error, 15 equal-width confidence bins; size: "
        + ("the program file" if program else "the weights as torch.save writes them"),
    ]
    for device in devices:
        first = rows[0]["speed"][device]
        notes.append(
            f"{device}: {first['device_name']}, {first['threads']} threads, {first['precision']}, "
            f"{'the program as saved (int8: compiled by Inductor)' if program else 'BatchNorm folded'}; "
            f"batch-1 latency median (p90) of {result['timing']['calls']} calls after {result['timing']['warmup']} "
            f"warm-up, throughput median of {result['timing']['repeats']} calls at batch {first['throughput_batch']}; "
            f"the models timed in turns{', speed-up: throughput over the teacher' if speedup else ''}"
        )
    return Group(table, *(Text(note) for note in notes))
