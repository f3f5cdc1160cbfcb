"""`distill quantize <checkpoint>`: static int8 quantization for the CPU, post-training and (with a fine-tune
from `runs.qat`) quantization-aware, against the fp32 model.

torch.ao.quantization is being retired; this uses its successor, torchao's PT2E flow: the model is
captured with torch.export, annotated by the X86InductorQuantizer (int8 activations per tensor, int8
weights per channel), calibrated on training images, converted, and compiled with Inductor, which
lowers the quantize/dequantize pairs to int8 oneDNN kernels. Inductor's `freezing` stays off: on torch
2.14 / torchao 0.18 it changed the quantized convolutions' outputs (by 1.7 logits on a 3-layer CNN).
The converted graph is written beside the checkpoint as a torch.export program (`best.int8.pt2`,
`ship/programs.py`), which `distill eval` loads, compiles the same way and measures. Quantization-aware
training uses the same quantizer in its QAT form (`prepare_qat`, `FakeQuantized`, `convert_qat`); what trains
the network is handed in (`FineTune`), since the loss lives above this layer.
"""

from __future__ import annotations

import importlib.util
import operator
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import fx, nn

from ..core.checkpoint import BEST
from ..core.config import RunConfig
from ..core.console import CONSOLE, library_log
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..data import DataSplits
from ..models.checkpoints import model_from_checkpoint
from ..models.fold import fold_batch_norm
from ..training.compute import Compute
from ..training.setup import Loaders, prepare_run
from .evaluate import (
    Subject,
    Timing,
    first_images,
    human_bytes,
    measure,
    predict,
    quality,
    serialized_bytes,
    speeds,
    subject,
)
from .export import export_checked
from .programs import batch_axis, compiled, program_record, require_cpp_compiler

# the int8 programs beside the checkpoint: best.pt -> best.int8.pt2 (post-training), best.qat.int8.pt2 (QAT)
PROGRAM_SUFFIX = ".int8.pt2"
QAT_PROGRAM_SUFFIX = ".qat.int8.pt2"


def require_torchao(command: str) -> None:
    """Refuse, in one line, to run `command` (which needs torchao's PT2E flow) without torchao."""
    if importlib.util.find_spec("torchao") is None:
        raise DistillError(f"{command} needs torchao: pip install 'distill-cli[export]'")


def x86_quantizer(qat: bool):
    """THE quantizer of both flows: torchao's X86InductorQuantizer, int8 activations per tensor and int8
    weights per channel; `qat`: the same scheme with fake-quantize modules that learn in training."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=qat))


def captured(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """`model` captured with torch.export on `example` (batch axis dynamic), as a module."""
    return torch.export.export(model, (example[:2].clone(),), dynamic_shapes=batch_axis()).module()


@contextmanager
def pt2e_flow(name: str):
    """Any failure of the PT2E flow as one line naming the model `name`."""
    try:
        yield
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistillError(f"{name} cannot be quantized with the PT2E flow ({type(error).__name__}: {reason})") from None


def quantize_int8(model: nn.Module, calibration: torch.Tensor, name: str) -> fx.GraphModule:
    """`model` (fp32, eval) as a PT2E int8 graph calibrated on `calibration` images (batch axis dynamic)."""
    require_torchao("distill quantize")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with pt2e_flow(name):
        prepared = prepare_pt2e(captured(model.eval(), calibration), x86_quantizer(qat=False))
        with torch.no_grad():
            for chunk in calibration.split(64):
                prepared(chunk)
        return convert_pt2e(prepared)


class FakeQuantized(nn.Module):
    """A network prepared for quantization-aware training (`prepare_qat`), driven as the training loop drives
    any network: `train()` runs its fake-quantize observers, which learn the activations' ranges, and
    `eval()` freezes them (and switches dropout; an exported graph has no train mode of its own)."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> "FakeQuantized":
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        self.training = mode
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.graph.apply(enable_observer if mode else disable_observer)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load `state_dict` as written by `state_dict()`, with the module versions a checkpoint's plain dict drops
        (torchao's observers take a missing version for their first and reset their `eps` to float32's)."""
        versioned = OrderedDict(state_dict)
        versioned._metadata = self.state_dict()._metadata
        return super().load_state_dict(versioned, strict, assign)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images)


def prepare_qat(model: nn.Module, example: torch.Tensor, name: str) -> FakeQuantized:
    """A trainable copy of `model` (frozen or not) with fake quantization where `x86_quantizer` puts int8. BatchNorm is folded
    first (the fine-tune keeps the trained statistics; torchao's QAT conv-BatchNorm pattern costs about 40 s
    to convert on this project's 2-core machine)."""
    require_torchao("distill quantize qat=true")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    with pt2e_flow(name):
        return FakeQuantized(prepare_qat_pt2e(captured(fold_batch_norm(model).train().requires_grad_(True), example), x86_quantizer(qat=True)))


def convert_qat(network: FakeQuantized, name: str) -> fx.GraphModule:
    """The int8 graph of a fine-tuned `network`, with the ranges its observers learnt (as `quantize_int8`'s)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with pt2e_flow(name):
        return convert_pt2e(network.eval().graph)


def graph_tensors(graph: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the quantized graph holds: int8 weights (convert_pt2e folds their quantization), their
    scales and zero points, and the biases."""
    return {node.target: operator.attrgetter(node.target)(graph) for node in graph.graph.nodes if node.op == "get_attr"}


@dataclass
class FineTuning:
    """What a QAT fine-tune (`run_quantize`'s `fine_tune`) works with: the network prepared for QAT, the fp32
    model it was made from, that model's checkpoint and run config, the run's compute, data and loaders, and the
    folder for the fine-tune's own files (its last.pt, to resume from)."""

    network: FakeQuantized
    fp32: nn.Module
    source: Path
    config: RunConfig
    compute: Compute
    data: DataSplits
    loaders: Loaders
    folder: Path


# trains `FineTuning.network` in place; returns what quantize.json records of the fine-tune
FineTune = Callable[[FineTuning], dict]


def run_quantize(path: str | Path, overrides: list[str], options: dict, fine_tune: FineTune | None = None) -> dict:
    """`distill quantize`: the checkpoint (a run folder: its best.pt) in int8 next to fp32: test accuracy and its
    drop, size, CPU latency and throughput; quantize.json in `out` (default `<run folder>/eval`), the int8
    program beside the checkpoint (`best.int8.pt2`, checked against the graph it was saved from), and
    torch's own warnings in quantize.log beside quantize.json. With `fine_tune` (`runs.qat`, `qat=true`), also
    the model fine-tuned with fake quantization (its files in `<out>/qat/`), converted and written as
    `best.qat.int8.pt2`: a third row."""
    require_cpp_compiler("distill quantize")
    require_torchao("distill quantize")
    if options["epochs"] and fine_tune is None:
        raise DistillError(f"epochs={options['epochs']} is the length of a quantization-aware fine-tune: add qat=true")
    sub = subject(path, overrides)
    source = Path(path) / BEST if Path(path).is_dir() else Path(path)
    folder = Path(options["out"]) if options["out"] else sub.folder / "eval"
    with library_log(folder / "quantize.log") as logged:
        result = quantize_checkpoint(source, sub, options, folder, fine_tune)
    write_json_atomic(result, folder / "quantize.json")
    CONSOLE.print(quantize_table(result))
    CONSOLE.print(f"wrote {folder / 'quantize.json'}{logged.mention()}")
    return result


def quantize_checkpoint(source: Path, sub: Subject, options: dict, folder: Path, fine_tune: FineTune | None = None) -> dict:
    """fp32 and int8 (post-training, and with `fine_tune` quantization-aware) measured (`run_quantize`), timed
    in turns on the CPU, and each int8 program written beside `source`."""
    compute, data, loaders = prepare_run(sub.config)
    model, name = model_from_checkpoint(source, data.info)
    label = f"{source} ({name})"
    timing = Timing(calls=options["calls"], batch=options["batch"])
    fp32 = measure("fp32", name, source, model, loaders.test, data.info, compute, timing, gpu=False)
    calibration = first_images(loaders.eval_loader(data.train), options["calibration"])
    graphs = {"int8": (quantize_int8(model.cpu(), calibration, label), PROGRAM_SUFFIX)}
    fine_tuned = {}
    if fine_tune is not None:
        network = prepare_qat(model, calibration, label)
        fine_tuned = fine_tune(FineTuning(network, model, source, sub.config, compute, data, loaders, folder / "qat"))
        graphs["int8 QAT"] = (convert_qat(network, label), QAT_PROGRAM_SUFFIX)
    test_images = first_images(loaders.test, timing.batch)
    forwards = {role: compiled(graph) for role, (graph, _) in graphs.items()}
    rows = []
    for role, (graph, suffix) in graphs.items():
        with torch.no_grad():
            logits, labels = predict(forwards[role], loaders.test)
        program = export_checked(graph, test_images, "pt2", source.with_suffix(suffix), atol=1e-5, record=program_record(source, model, "int8"))
        rows.append({
            "role": role,
            "name": name,
            "checkpoint": str(source),
            **quality(logits, labels, data.info.class_names),
            "params": fp32.row["params"],
            "size_bytes": serialized_bytes(graph_tensors(graph)),
            "macs": fp32.row["macs"],
            "file": program["file"],
            "file_bytes": program["bytes"],
        })
    timed = speeds([fp32.forwards["cpu"], *forwards.values()], test_images, torch.device("cpu"), timing, ["fp32"] + ["int8"] * len(rows))
    for row, speed in zip([fp32.row, *rows], timed):
        row["speed"] = {"cpu": speed}
    result = {
        "command": "quantize",
        "dataset": data.info.name,
        "test_images": len(data.test),
        "calibration_images": len(calibration),
        "flow": "torchao PT2E, X86InductorQuantizer (static, int8 activations per tensor, weights per channel), Inductor",
        "timing": timing.__dict__,
        "accuracy_drop": fp32.row["test_acc"] - rows[0]["test_acc"],
        "models": [fp32.row, *rows],
    }
    if fine_tuned:
        result["qat"] = {**fine_tuned, "accuracy_drop": fp32.row["test_acc"] - rows[1]["test_acc"]}
    return result


def int8_instructions() -> list[str]:
    """The CPU's int8 dot-product instructions (VNNI, AMX) that oneDNN's int8 kernels gain from (Linux: from
    /proc/cpuinfo; elsewhere none are named)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return [flag for flag in ("avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]


# int8 is called slower than fp32 only beyond this factor: less is within the timing noise of a shared machine
SLOWER_BEYOND = 1.1


def slower_note(fp32: dict, int8: dict) -> str | None:
    """THE sentence saying that an int8 row ran slower than fp32 on this machine, and why; None when it did not."""
    base, quantized = fp32["speed"]["cpu"], int8["speed"]["cpu"]
    slower = [
        what for what, worse in (
            ("batch-1 latency", quantized["latency_ms_median"] > SLOWER_BEYOND * base["latency_ms_median"]),
            ("throughput", SLOWER_BEYOND * quantized["throughput_images_per_s"] < base["throughput_images_per_s"]),
        ) if worse
    ]
    if not slower:
        return None
    instructions = int8_instructions()
    cpu = f"this CPU's int8 instructions: {', '.join(instructions)}" if instructions else "this CPU has no int8 dot-product instructions (VNNI, AMX), so int8 arithmetic itself is no faster"
    return (
        f"{int8['role']} is slower than fp32 here in {' and '.join(slower)} ({quantized['latency_ms_median']:.3f} against "
        f"{base['latency_ms_median']:.3f} ms, {quantized['throughput_images_per_s']:,.0f} against {base['throughput_images_per_s']:,.0f} img/s): "
        f"at {int8['macs'] / 1e6:.2f} MMACs per image its time goes to quantizing and dequantizing the activations between "
        f"layers and to per-call overhead, not to the arithmetic int8 speeds up ({cpu})"
    )


def quantize_table(result: dict) -> Group:
    table = Table(title=f"distill quantize: {result['dataset']}, {result['test_images']:,} test images")
    for column in ("precision", "model", "test acc", "ECE", "size", "cpu b1 ms (p90)", "cpu img/s"):
        table.add_column(column, justify="left" if column in ("precision", "model") else "right")
    for row in result["models"]:
        timed = row["speed"]["cpu"]
        table.add_row(
            row["role"], row["name"], f"{row['test_acc']:.2%}", f"{row['ece']:.3f}", human_bytes(row["size_bytes"]),
            f"{timed['latency_ms_median']:.3f} ({timed['latency_ms_p90']:.3f})", f"{timed['throughput_images_per_s']:,.0f}",
        )
    fp32, *int8 = result["models"]
    timed = fp32["speed"]["cpu"]
    notes = [f"accuracy drop {100 * result['accuracy_drop']:+.2f} points; calibrated on {result['calibration_images']} training images"]
    if "qat" in result:
        qat = result["qat"]
        notes.append(
            f"int8 QAT: accuracy drop {100 * qat['accuracy_drop']:+.2f} points after {qat['epochs']} epoch(s) of fake-quantized "
            f"fine-tuning with the fp32 model as teacher (T={qat['T']:g}, alpha={qat['alpha']:g}, lr {qat['lr']:g}; {qat['folder']})"
        )
    notes += [
        f"{result['flow']}; fp32: eager, BatchNorm folded",
        f"cpu: {timed['device_name']}, {timed['threads']} threads, fp32 and int8 timed in turns; size: the weights as torch.save "
        "writes them (int8: the graph's tensors)",
        *(f"{row['role']} program: {row['file']} ({human_bytes(row['file_bytes'])}, torch.export; distill eval runs it)" for row in int8),
        *filter(None, (slower_note(fp32, row) for row in int8)),
    ]
    return Group(table, *(Text(note) for note in notes))
