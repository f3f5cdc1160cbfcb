"""`distill export <checkpoint> format=onnx|pt2`: the file a user deploys, checked against PyTorch.

ONNX goes through `torch.onnx.export(..., dynamo=True)`, pt2 through `torch.export`; both with a dynamic
batch axis. The file is written under a temporary name, run (onnxruntime for ONNX, the loaded
ExportedProgram for pt2) on real test images at batch 1 and at a large batch, compared with PyTorch's
logits, and renamed into place only when it matches: a failed export or check leaves no file behind.
A pt2 file carries distill's record of where it came from (`ship/programs.py`), so `distill eval` runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import BEST
from ..core.console import CONSOLE, library_log
from ..core.errors import DistillError, did_you_mean
from ..core.files import UMASK, write_json_atomic
from ..models.checkpoints import model_from_checkpoint
from ..training.setup import prepare_run
from .evaluate import first_images, subject
from .programs import batch_axis, load_program, program_record, save_program

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


# the packages each format needs beyond torch: the `export` extra
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "pt2": ()}


CHECK_IMAGES = 256


def check_format(fmt: str) -> None:
    """Refuse an unknown format, or one whose packages are missing, in one line."""
    if fmt not in FORMATS:
        raise DistillError(f"format={fmt!r}: not an export format; {did_you_mean(fmt, FORMATS)}")
    missing = [name for name in NEEDS[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise DistillError(f"format={fmt} needs {', '.join(missing)}: pip install 'distill-cli[export]'")


def write_exported(model: nn.Module, example: torch.Tensor, fmt: str, path: Path, record: dict | None = None) -> None:
    """Export `model` (traced on `example`, batch axis dynamic) to `path` in `fmt`; a pt2 program carries
    `record` (`ship.programs`), so that `distill eval` can run it."""
    if fmt == "onnx":
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's and optimizer's progress lines
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                dynamic_shapes=batch_axis(), verbose=False,
            )
            program.save(str(path))
    else:
        save_program(model, example, path, record)


def load_exported(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file on float32 CPU images: onnxruntime for ONNX, the ExportedProgram for pt2."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: torch.from_numpy(session.run(None, {name: images.contiguous().numpy()})[0])
    return load_program(path)


@torch.inference_mode()
def parity(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> dict:
    """How the exported file's logits compare with PyTorch's on `images`, run at batch 1 and all at once."""
    expected = model(images)
    got = torch.cat([run(images[:1]), run(images)[1:]])
    return {
        "images": len(images),
        "max_abs_diff": (got - expected).abs().max().item(),
        "class_agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item(),
    }


def export_checked(model: nn.Module, images: torch.Tensor, fmt: str, path: Path, atol: float, record: dict | None = None) -> dict:
    """Export `model` (on the CPU, in eval mode) to `path`, check it against PyTorch on `images` (CPU, fp32)
    within `atol`, then rename it into place; the parity figures are also written to `<path>.json`. Any
    failure leaves no file. A pt2 program carries `record` (`ship.programs.program_record`)."""
    check_format(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=FORMATS[fmt])
    os.close(handle)
    try:
        try:
            write_exported(model, images[:2].clone(), fmt, Path(temp), record)  # a view would save all of `images`
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DistillError(f"{path}: cannot export to {fmt} ({type(error).__name__}: {reason})") from None
        result = {"file": str(path), "format": fmt, "bytes": os.path.getsize(temp), **parity(model, load_exported(Path(temp), fmt), images)}
        if not result["max_abs_diff"] <= atol:
            raise DistillError(
                f"{path}: the exported {fmt} file's logits differ from PyTorch's by {result['max_abs_diff']:.3g} > atol={atol:g} "
                f"(class agreement {result['class_agreement']:.2%})"
            )
        os.chmod(temp, 0o666 & ~UMASK)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    result["atol"] = atol
    write_json_atomic(result, path.with_name(path.name + ".json"))
    return result


def describe(result: dict) -> str:
    return (
        f"{result['file']} ({result['bytes'] / 1e3:.1f} kB): on {result['images']} test images against PyTorch, "
        f"max |logit difference| {result['max_abs_diff']:.2e}, same predicted class {result['class_agreement']:.2%}"
    )


def run_export(path: str | Path, fmt: str, overrides: list[str], out: str = "", atol: float = 1e-4) -> dict:
    """`distill export`: the checkpoint (a run folder: its best.pt) as an ONNX or pt2 file, checked on its test images."""
    check_format(fmt)
    source = Path(path) / BEST if Path(path).is_dir() else Path(path)
    _, data, loaders = prepare_run(subject(path, overrides).config)
    model, _ = model_from_checkpoint(source, data.info)
    target = Path(out) if out else source.with_suffix(FORMATS[fmt])
    with library_log(target.with_name(target.name + ".log")) as logged:
        result = export_checked(model, first_images(loaders.test, CHECK_IMAGES), fmt, target, atol, program_record(source, model, "fp32"))
    CONSOLE.print(describe(result) + logged.mention())
    return result
