"""Programs: models saved with torch.export as `.pt2` files that `distill eval` can run again.

A program written by distill carries a record (the extra file `distill.json`): the precision (`int8` from
`distill quantize`, `fp32` from `distill export format=pt2`), the model's name and parameter count, the
checkpoint it came from, and that checkpoint's run config, dataset and class count, from which eval
rebuilds the test data. An int8 program holds the converted PT2E graph itself (int8 weights, quantize /
dequantize pairs); run eagerly it computes the same logits as that graph, and compiled by Inductor
(`compiled`) it runs the int8 oneDNN kernels that `distill quantize` timed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx, nn

from ..core.checkpoint import load_checkpoint
from ..core.errors import DistillError
from ..models import count_parameters
from ..models.checkpoints import describe

RECORD = "distill.json"  # the extra file of a .pt2 that holds distill's record


def batch_axis() -> tuple[dict, ...]:
    """torch.export's dynamic_shapes for one image batch whose first axis is free."""
    return ({0: torch.export.Dim("batch")},)


def program_record(checkpoint: Path, model: nn.Module, precision: str) -> dict:
    """The record of a program made from `checkpoint`'s model (`model`: its fp32 network)."""
    saved = load_checkpoint(checkpoint)
    return {
        "precision": precision,
        "name": describe(saved["arch"], saved["kwargs"]),
        "params": count_parameters(model),
        "checkpoint": str(checkpoint),
        "dataset": saved.get("dataset"),
        "num_classes": saved["num_classes"],
        "config": saved.get("config") or {},
    }


def save_program(model: nn.Module, example: torch.Tensor, path: Path, record: dict | None) -> None:
    """`model` exported with torch.export (traced on `example`, batch axis dynamic) to `path`, with `record`."""
    program = torch.export.export(model, (example,), dynamic_shapes=batch_axis())
    torch.export.save(program, str(path), extra_files={RECORD: json.dumps(record or {})})


def read_record(path: Path) -> dict:
    """distill's record in the program at `path` ({} when it has none), read from the archive alone (its
    `extra/distill.json`), before the program loads."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((name for name in archive.namelist() if name.endswith(f"/extra/{RECORD}")), None)
            return json.loads(archive.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise DistillError(f"cannot read program {path}: {error}") from None


def load_program(path: Path) -> fx.GraphModule:
    """The program at `path` as a module (CPU, eager)."""
    if read_record(path).get("precision") == "int8" and importlib.util.find_spec("torchao") is not None:
        import torchao.quantization.pt2e  # noqa: F401  registers the quantize/dequantize operators it calls
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistillError(f"cannot load program {path}: {reason}") from None
    return program.module()


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would build CPU kernels with (CXX, else g++, c++ or clang++); None if none."""
    return next((name for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name and shutil.which(name)), None)


def require_cpp_compiler(command: str) -> None:
    """Refuse, in one line, to run `command` (which compiles an int8 model) without a C++ compiler."""
    if cpp_compiler() is None:
        raise DistillError(f"{command} compiles the int8 model with Inductor, which needs a C++ compiler "
                           "(g++ or clang++, or CXX set); none was found")


def compiled(graph: fx.GraphModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The int8 graph compiled by Inductor (int8 kernels), for any batch size, taking images in any memory format."""
    run = torch.compile(graph, dynamic=True)
    return lambda images: run(images.contiguous())


def distill_record(path: Path) -> dict:
    """`read_record`, refusing a .pt2 that distill did not write (it has no record to rebuild the data from)."""
    record = read_record(path)
    if not record:
        raise DistillError(f"{path} is a torch.export program without distill's record: distill eval reads the .pt2 "
                           "files that distill quantize and distill export format=pt2 write")
    return record


def program_forward(path: Path, module: fx.GraphModule, record: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """How `distill eval` runs the program `module` from `path`: int8 compiled by Inductor, as `distill
    quantize` ran it; fp32 eagerly."""
    if record["precision"] != "int8":
        return module
    require_cpp_compiler(f"distill eval of {path}")
    return compiled(module)
