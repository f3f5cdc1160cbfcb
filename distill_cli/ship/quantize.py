"""`distill quantize <checkpoint>`: post-training static int8 quantization for the CPU, against the fp32 model.

torch.ao.quantization is being retired; this uses its successor, torchao's PT2E flow: the model is
captured with torch.export, annotated by the X86InductorQuantizer (int8 activations per tensor, int8
weights per channel), calibrated on training images, converted, and compiled with Inductor, which
lowers the quantize/dequantize pairs to int8 oneDNN kernels. Inductor's `freezing` stays off: on torch
2.14 / torchao 0.18 it changed the quantized convolutions' outputs (by 1.7 logits on a 3-layer CNN).
The converted graph is written beside the checkpoint as a torch.export program (`best.int8.pt2`,
`ship/programs.py`), which `distill eval` loads, compiles the same way and measures.
"""

from __future__ import annotations

import importlib.util
import operator
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import fx, nn

from ..core.checkpoint import BEST
from ..core.console import CONSOLE, library_log
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..models.checkpoints import model_from_checkpoint
from ..training.setup import prepare_run
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
from .programs import compiled, program_record, require_cpp_compiler

# the int8 program beside the checkpoint: best.pt -> best.int8.pt2
PROGRAM_SUFFIX = ".int8.pt2"


def quantize_int8(model: nn.Module, calibration: torch.Tensor, name: str) -> fx.GraphModule:
    """`model` (fp32, eval) as a PT2E int8 graph calibrated on `calibration` images (batch axis dynamic)."""
    if importlib.util.find_spec("torchao") is None:
        raise DistillError("distill quantize needs torchao: pip install 'distill-cli[export]'")
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    try:
        graph = torch.export.export(model.eval(), (calibration[:2].clone(),), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for chunk in calibration.split(64):
                prepared(chunk)
        return convert_pt2e(prepared)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistillError(f"{name} cannot be quantized with the PT2E flow ({type(error).__name__}: {reason})") from None


def graph_tensors(graph: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the quantized graph holds: int8 weights (convert_pt2e folds their quantization), their
    scales and zero points, and the biases."""
    return {node.target: operator.attrgetter(node.target)(graph) for node in graph.graph.nodes if node.op == "get_attr"}


def run_quantize(path: str | Path, overrides: list[str], options: dict) -> dict:
    """`distill quantize`: the checkpoint (a run folder: its best.pt) in int8 next to fp32: test accuracy and its
    drop, size, CPU latency and throughput; quantize.json in `out` (default `<run folder>/eval`), the int8
    program beside the checkpoint (`best.int8.pt2`, checked against the graph it was saved from), and
    torch's own warnings in quantize.log beside quantize.json."""
    require_cpp_compiler("distill quantize")
    sub = subject(path, overrides)
    source = Path(path) / BEST if Path(path).is_dir() else Path(path)
    folder = Path(options["out"]) if options["out"] else sub.folder / "eval"
    with library_log(folder / "quantize.log") as logged:
        result = quantize_checkpoint(source, sub, options)
    write_json_atomic(result, folder / "quantize.json")
    CONSOLE.print(quantize_table(result))
    CONSOLE.print(f"wrote {folder / 'quantize.json'}{logged.mention()}")
    return result


def quantize_checkpoint(source: Path, sub: Subject, options: dict) -> dict:
    """fp32 and int8 measured (`run_quantize`), timed in turns on the CPU, and the int8 program written
    beside `source`."""
    compute, data, loaders = prepare_run(sub.config)
    model, name = model_from_checkpoint(source, data.info)
    timing = Timing(calls=options["calls"], batch=options["batch"])
    fp32 = measure("fp32", name, source, model, loaders.test, data.info, compute, timing, gpu=False)
    calibration = first_images(loaders.eval_loader(data.train), options["calibration"])
    graph = quantize_int8(model.cpu(), calibration, f"{source} ({name})")
    test_images = first_images(loaders.test, timing.batch)
    forward = compiled(graph)
    with torch.no_grad():
        logits, labels = predict(forward, loaders.test)
    int8 = {
        "role": "int8",
        "name": name,
        "checkpoint": str(source),
        **quality(logits, labels, data.info.class_names),
        "params": fp32.row["params"],
        "size_bytes": serialized_bytes(graph_tensors(graph)),
        "macs": fp32.row["macs"],
    }
    cpu = torch.device("cpu")
    fp32.row["speed"], int8["speed"] = ({"cpu": result} for result in speeds([fp32.forwards["cpu"], forward], test_images, cpu, timing, ["fp32", "int8"]))
    program = export_checked(graph, test_images, "pt2", source.with_suffix(PROGRAM_SUFFIX), atol=1e-5, record=program_record(source, model, "int8"))
    int8.update(file=program["file"], file_bytes=program["bytes"])
    return {
        "command": "quantize",
        "dataset": data.info.name,
        "test_images": len(data.test),
        "calibration_images": len(calibration),
        "flow": "torchao PT2E, X86InductorQuantizer (static, int8 activations per tensor, weights per channel), Inductor",
        "timing": timing.__dict__,
        "accuracy_drop": fp32.row["test_acc"] - int8["test_acc"],
        "models": [fp32.row, int8],
    }


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
    timed, int8 = result["models"][0]["speed"]["cpu"], result["models"][1]
    notes = [
        f"accuracy drop {100 * result['accuracy_drop']:+.2f} points; calibrated on {result['calibration_images']} training images",
        f"{result['flow']}; fp32: eager, BatchNorm folded",
        f"cpu: {timed['device_name']}, {timed['threads']} threads, fp32 and int8 timed in turns; size: the weights as torch.save "
        "writes them (int8: the graph's tensors)",
        f"int8 program: {int8['file']} ({human_bytes(int8['file_bytes'])}, torch.export; distill eval runs it)",
    ]
    return Group(table, *(Text(note) for note in notes))
