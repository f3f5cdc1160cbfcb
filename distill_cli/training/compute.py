"""Where and how to compute: the resolved device, precision and kernel choices of a run (`Compute`), and
the forward passes built from them (trained, with feature points, frozen with BatchNorm folded).
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.config import DeviceConfig
from ..core.errors import DistillError
from ..core.world import SINGLE, World
from ..models.features import Outputs, feature_extractor
from ..models.fold import fold_batch_norm
from .data_parallel import data_parallel

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Compute:
    """Where and how to compute: the resolved device, precision and kernel choices of a run."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    channels_last: bool | None = False  # None: for conv nets wide enough to gain (see `uses_channels_last`)
    compile: bool = False
    fold_frozen: bool = True  # frozen models run with BatchNorm folded (see `frozen_forward`)
    world: World = SINGLE  # the data-parallel processes this one trains with (see distributed.py)
    sync_batchnorm: bool = False  # with several processes: BatchNorm over the whole step's batch
    threads: int = 0  # torch's intra-op CPU threads in this process (device.threads, or torch's default)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype loaders normalise batches into: the autocast dtype, or float32."""
        return _AUTOCAST_DTYPES.get(self.precision, torch.float32)

    def uses_channels_last(self, model: nn.Module) -> bool:
        """Whether `model` runs in channels_last memory: conv nets, when on; with auto (None) only those
        whose convolutions have at least 8 output channels on median (narrower ones measured slower so
        on CPU: cnn width 4 trains at 0.56x in channels_last, width 8 at 1.1x, resnet8 at 1.3x)."""
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not widths or self.channels_last is False:
            return False
        return self.channels_last is True or statistics.median(widths) >= 8

    def place(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device, in channels_last memory when `uses_channels_last(model)`."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.uses_channels_last(model) else model

    def forward(self, model: nn.Module, compile: bool = True, trained: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """`model`'s forward pass as steps (and, with compile=False, evaluation) call it: the batch in the
        model's memory format (a no-op when the loader already made it so), torch.compile'd with
        `device.compile=true`; a `trained` model goes through DistributedDataParallel when several processes
        train it. The module itself stays unwrapped, so its state_dict is unaffected."""
        memory_format = torch.channels_last if self.uses_channels_last(model) else torch.contiguous_format
        run = data_parallel(model, self.world, self.sync_batchnorm) if trained else model
        run = torch.compile(run) if self.compile and compile else run

        def forward(images: torch.Tensor) -> torch.Tensor:
            return run(images.contiguous(memory_format=memory_format))

        return forward

    def outputs(self, model: nn.Module, info, points: tuple[str, ...] = (), role: str = "model") -> Callable[[torch.Tensor], Outputs]:
        """The trained `model`'s forward (as `forward`), returning `Outputs`: the logits and the feature points
        `points` (a torch.fx extractor sharing `model`'s parameters, see `models.features.feature_extractor`)."""
        if not points:
            forward = self.forward(model, trained=True)
            return lambda images: Outputs(forward(images))
        # the extractor holds the same convolutions, so it gets the model's memory format
        forward = self.forward(feature_extractor(model, info, points, role), trained=True)

        return lambda images: _as_outputs(forward(images))

    def frozen_forward(
        self, model: nn.Module, compile: bool = True, points: tuple[str, ...] = (), info=None, role: str = "teacher"
    ) -> Callable[[torch.Tensor], Outputs]:
        """The forward pass of a frozen `model` as kd steps run it: in inference mode, eval mode, BatchNorm
        folded into the layers before it (`fold_batch_norm`, after extracting the feature points `points`
        with torch.fx: hooks would not fire in the folded graph), otherwise as `forward`. Logits and
        features come back as ordinary tensors without grad (a loss or a trainable part may save them for
        its backward pass, which inference tensors refuse). `model` itself is unchanged."""
        source = feature_extractor(model.eval(), info, points, role) if points else model
        folded = self.place(fold_batch_norm(source) if self.fold_frozen else source.eval()).requires_grad_(False)
        run = self.forward(folded, compile)

        def frozen(images: torch.Tensor) -> Outputs:
            with torch.inference_mode():
                result = run(images)
            if not points:
                return Outputs(result.clone())
            return _as_outputs({name: value.clone() for name, value in result.items()})

        return frozen

    def autocast(self, cache: bool = True):
        """Autocast to the run's precision (fp32: none); `cache=False` without the cast weights' cache, which a
        step captured in a CUDA graph may not keep (torch's CUDA graph notes)."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision], cache_enabled=cache)

    def grad_scaler(self, clip_grad_norm: float | None = None) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling); with `clip_grad_norm`, its
        step clips the gradients first (`ClippingGradScaler`)."""
        enabled = self.precision == "fp16"
        if clip_grad_norm is None:
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        return ClippingGradScaler(self.device.type, enabled=enabled, clip_grad_norm=clip_grad_norm)


class ClippingGradScaler(torch.amp.GradScaler):
    """A GradScaler whose `step` clips the global L2 norm of the optimizer's gradients to `clip_grad_norm` before the
    optimizer steps, once they are unscaled (fp16) and averaged over the processes (the step comes after both).
    No host sync: torch's `clip_grad_norm_` scales by min(1, max / norm) on the device, so a CUDA graph can hold it;
    a non-finite norm is left to the GradScaler (fp16 skips the step) or to the epoch's divergence check.
    `report()`: the last step's norm before the clip and whether the clip acted, for the epoch's metrics."""

    def __init__(self, device: str, enabled: bool, clip_grad_norm: float):
        super().__init__(device, enabled=enabled)
        self.clip_grad_norm = clip_grad_norm
        self.norm: torch.Tensor | None = None

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        self.unscale_(optimizer)  # a no-op where the scaler is disabled
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norm = torch.nn.utils.clip_grad_norm_(stepped, self.clip_grad_norm, foreach=True)
        return super().step(optimizer, *args, **kwargs)

    def report(self) -> dict[str, torch.Tensor]:
        """`grad_norm` (the gradients' global norm before the clip) and `grad_clipped` (1 where the clip acted) of the
        last step, as device tensors: the epoch's metrics average them over its steps."""
        return {"grad_norm": self.norm, "grad_clipped": (self.norm > self.clip_grad_norm).float()}


def _as_outputs(extracted: dict[str, torch.Tensor]) -> Outputs:
    """A feature extractor's `{point: tensor, "logits": tensor}` as `Outputs`."""
    features = dict(extracted)
    return Outputs(features.pop("logits"), features)


def resolve_compute(cfg: DeviceConfig, world: World = SINGLE) -> Compute:
    """Pick the device (`auto`: CUDA when present; with several processes, GPU number local rank) and
    precision (`auto`: bf16 on CUDA, else fp32), and set torch's CPU threads to `device.threads` (0: torch's
    default; a parallel sweep's jobs arrive here with their share of the cores, see `cli.main.share_cores`)."""
    if cfg.type == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.type)
        except RuntimeError:
            raise DistillError(f"device.type: {cfg.type!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DistillError("device.type: CUDA requested but torch sees no CUDA device (use device=auto or cpu)")
    if world.distributed:
        device = _rank_device(device, world)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DistillError(f"device.precision: fp16 needs CUDA (running on {device.type}); use bf16 or fp32")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    channels_last = False if cfg.channels_last is None and device.type == "mps" else cfg.channels_last
    return Compute(
        device, precision, channels_last=channels_last, compile=cfg.compile, world=world, sync_batchnorm=cfg.sync_batchnorm,
        threads=torch.get_num_threads(),
    )


def _rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: GPU number local rank (one GPU per process), or the CPU."""
    if device.type == "cpu":
        return device
    if device.type != "cuda" or device.index is not None:
        raise DistillError(f"device.type: {device} with several processes; use cuda (each process takes GPU <local rank>) or cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise DistillError(
            f"device.type: rank {world.rank} has local rank {world.local_rank} but this machine has "
            f"{torch.cuda.device_count()} GPU(s); start at most one process per GPU"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (`cpu_name`)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    """The CPU's model name (Linux) or architecture, and the vector extensions torch uses on it."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"
