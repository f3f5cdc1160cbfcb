"""Data-parallel training with torch.distributed: one process per device, launched by torchrun.

Two ways in, one engine:
- `torchrun --nproc_per_node=N -m distill_cli kd ...` (one node or many, torchrun's rendezvous flags):
  every process runs `distill`; rank 0 composes the config with Hydra, makes the run folder and hands
  (command, validated config, run folder) to the other ranks (`lead` / `follow`), which never touch
  Hydra, so there is one run folder and one log.
- `distill kd device.processes=N`: the Hydra job starts `torchrun --standalone` itself (`launch`) on this
  machine, each process running `distributed.main`.

In training (engine.fit) each rank takes its slice of every global batch (loaders: `Loader(shard=...)`),
the student is wrapped in DistributedDataParallel (`World.wrap`), a KD method's trainable parts have
their gradients averaged (`World.average_gradients`), epoch metrics are summed over ranks, and rank 0
alone reads and writes files; what other ranks need from a file (a checkpoint to resume, a teacher) rank 0
broadcasts (`World.on_main`), so ranks on other nodes need no shared filesystem, only the data.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistillError, Interrupted

log = logging.getLogger("distill")
T = TypeVar("T")
LAUNCH_FILE = "distributed.json"  # in the run folder: the command and config `launch` hands its workers
_ERROR_KEY = "distill/error"  # in torchrun's store: the first rank's one-line error


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    joined: bool = False  # in a torch.distributed process group (torchrun started it; also with one process)

    @property
    def distributed(self) -> bool:
        """Whether training goes through torch.distributed (DDP, collectives), even as its only process."""
        return self.joined

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reads and writes the run's files and logs."""
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` run on rank 0 and its result broadcast; a DistillError there is raised on every rank,
        so all ranks take the same path (a file only rank 0 can read, a check only it makes)."""
        if not self.distributed:
            return work()
        result: tuple[str, Any] = ("", None)
        if self.is_main:
            try:
                result = ("ok", work())
            except DistillError as error:
                self.broadcast(("error", str(error)))
                raise
        kind, value = self.broadcast(result)
        if kind == "error":
            raise DistillError(value)
        return value

    def gather(self, value: T) -> list[T] | None:
        """Every rank's `value`, as a list in rank order on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        values = [None] * self.size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (in place; returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s elementwise minimum over ranks (in place; returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def wrap(self, model: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
        """`model` in DistributedDataParallel (gradients averaged over ranks in backward, rank 0's
        BatchNorm statistics broadcast at each forward; with `sync_batchnorm`, BatchNorm layers computing
        their statistics over every rank's batch); `model` itself when training alone."""
        if not self.distributed:
            return model
        if sync_batchnorm:  # the layers are replaced; their weights and statistics stay the model's
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients of `module`'s trainable parameters over ranks (a KD method's parts:
        DDP wraps the student, whose forward it sees, not the loss)."""
        if not self.distributed:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def report_error(self, message: str) -> None:
        """Leave the one-line error `root_cause` gave where the other ranks find it; the first one wins."""
        if self.distributed:
            try:
                store = dist.distributed_c10d._get_default_store()
                store.compare_set(_ERROR_KEY, "", message)
            except Exception:  # the store is gone too: the launcher reports the exit codes
                pass

    def root_cause(self, message: str, error: BaseException) -> str:
        """The error to report for `error` on this rank: its own message (naming the rank), unless it is
        only the communication failure another rank's death or error caused; then that rank's message."""
        if not self.distributed:
            return message
        if not _communication_failure(error):
            return f"rank {self.rank}: {message}"
        for _ in range(20):  # the failing rank writes its message as it exits
            try:
                store = dist.distributed_c10d._get_default_store()
                if store.check([_ERROR_KEY]):
                    return store.get(_ERROR_KEY).decode()
            except Exception:
                break
            time.sleep(0.25)
        return f"rank {self.rank}: lost contact with another rank (it died or was killed): {message}"


SINGLE = World()
_world = SINGLE


def world() -> World:
    """The world this process trains in (`join` sets it; SINGLE otherwise)."""
    return _world


def _communication_failure(error: BaseException) -> bool:
    return isinstance(error, (dist.DistBackendError, dist.DistNetworkError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ("Connection closed", "Gloo", "NCCL", "Broken pipe"))
    )


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (as one rank of one or more)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join() -> World:
    """Join the process group torchrun set up (gloo for CPU tensors, NCCL for CUDA ones when there is a
    GPU) and return this process's `World`; SINGLE when torchrun did not start this process."""
    global _world
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), joined=True)
    return _world


def leave() -> None:
    """Leave the process group (at the end of a rank's work)."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = SINGLE


_handed_out = False  # whether rank 0 of `torchrun -m distill_cli` has handed the other ranks their work


def lead(command: str, plain_config: dict, run_dir: Path) -> None:
    """Rank 0 of `torchrun -m distill_cli`: hand the other ranks the run's command, config and folder."""
    global _handed_out
    if _world.distributed and _world.is_main and not _handed_out:
        _handed_out = True
        _world.broadcast((command, plain_config, str(run_dir)))


def release() -> None:
    """Rank 0 at the end of `distill`: tell ranks still waiting for work that there is none (it stopped
    before training: a bad config, --help, ...), then leave the process group."""
    global _handed_out
    if _world.distributed and _world.is_main and not _handed_out:
        _world.broadcast(None)
    _handed_out = False
    leave()


def quiet_rank() -> None:
    """Ranks other than 0 print nothing but their own errors: rank 0 logs for the run."""
    from .report import silence

    silence()
    logging.getLogger().setLevel(logging.ERROR)


def run_rank(command: str, plain_config: dict, run_dir: Path) -> int:
    """Run `command` on this rank with an already validated config; errors become one line on stderr
    (the first rank's error also goes to the others, see `root_cause`). Returns the exit status."""
    from .cli import _runner, one_line
    from .config import validate_config
    from omegaconf import OmegaConf

    try:
        config = validate_config(command, OmegaConf.create(plain_config))
        _runner(command)(config, run_dir)
        return 0
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        if _world.is_main:  # read by `launch`
            print(f"distill {command}: interrupted (signal {stopped.signum}): {stopped.where}", file=sys.stderr)
        return 128 + stopped.signum
    except Exception as error:
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            raise
        message = _world.root_cause(one_line(error), error)
        _world.report_error(message)
        print(f"distill {command}: error: {message}", file=sys.stderr)
        return 1


def follow(command: str) -> int:
    """A rank other than 0 of `torchrun -m distill_cli`: wait for rank 0's work and do its part."""
    quiet_rank()
    work = _world.broadcast(None)
    try:
        if work is None:  # rank 0 stopped before training (a bad config, --help, ...): it says why
            return 0
        command, plain_config, run_dir = work
        return run_rank(command, plain_config, Path(run_dir))
    finally:
        leave()


def check_devices(cfg, processes: int) -> None:
    """Refuse, before any process starts, what `processes` data-parallel processes cannot do with the
    device config `cfg`: more processes than GPUs, one named GPU for all, SyncBatchNorm on the CPU."""
    on_gpu = cfg.type.startswith("cuda") or (cfg.type == "auto" and torch.cuda.is_available())
    if cfg.type not in ("auto", "cpu", "cuda"):
        raise DistillError(f"device.type={cfg.type} with {processes} processes; use cuda (process k takes GPU k) or cpu")
    if on_gpu and processes > torch.cuda.device_count():
        raise DistillError(f"device.processes={processes}, but this machine has {torch.cuda.device_count()} GPU(s): one process per GPU")
    if cfg.sync_batchnorm and not on_gpu:
        raise DistillError("device.sync_batchnorm: SyncBatchNorm runs on CUDA GPUs only (torch refuses it on the CPU)")


def launch(command: str, plain_config: dict, run_dir: Path, processes: int) -> dict:
    """`device.processes=N`: run `command` in N processes on this machine with torchrun, in `run_dir`,
    and return rank 0's summary. A rank's error is raised here as one line naming the rank."""
    from .files import write_json_atomic
    from .runs import read_summary

    write_json_atomic({"command": command, "config": plain_config}, run_dir / LAUNCH_FILE)
    torchrun_log = run_dir / "torchrun.log"
    arguments = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "--monitor-interval=0.5", "--no-python", sys.executable, "-c", _RANK_PROGRAM, str(run_dir),
    ]
    log.info(f"distill {command}: {processes} processes (torchrun --standalone --nproc_per_node={processes})")
    start = torchrun_log.stat().st_size if torchrun_log.exists() else 0
    # the ranks' logs go to the console (stdout); stderr (torchrun's own multi-line reports, the ranks'
    # one-line errors) to torchrun.log, from which the first error is raised here as one line
    with open(torchrun_log, "ab") as agent_log:
        process = subprocess.Popen(arguments, stderr=agent_log)
        signum = None
        try:
            status = process.wait()
        except KeyboardInterrupt as interrupt:
            # Ctrl-C reached torchrun too (same terminal); a SIGTERM meant for this process is passed on.
            # torchrun hands it to every rank, which stop at the next step and save last.pt
            signum = getattr(interrupt, "signum", signal.SIGINT)
            if signum == signal.SIGTERM:
                process.send_signal(signal.SIGTERM)
            status = process.wait()
    summary = read_summary(run_dir)
    if status == 0 and summary is not None and summary.get("status") == "completed":
        return summary
    with open(torchrun_log, "rb") as agent_log:
        agent_log.seek(start)
        lines = agent_log.read().decode(errors="replace").splitlines()
    stopped = [re.match(rf"distill {command}: interrupted \(signal (\d+)\): (.*)", line) for line in lines]
    stopped = [match for match in stopped if match]
    if stopped or signum is not None:
        raise Interrupted(signum or int(stopped[0][1]), stopped[0][2] if stopped else "")
    errors = [line.split(": error: ", 1)[1] for line in lines if line.startswith(f"distill {command}: error: ")]
    if errors:
        raise DistillError(errors[0])
    raise DistillError(f"the {processes} training processes ended with exit status {status} (see {torchrun_log})")


# what each process `launch` starts runs (a program rather than `-m` of this module, which would load
# this module twice: as __main__ and as distill_cli.distributed)
_RANK_PROGRAM = "import sys; from distill_cli.distributed import main; sys.exit(main(sys.argv[1:]))"


def main(argv: list[str]) -> int:
    """One rank of a `launch`ed run: `argv` = [run dir]."""
    run_dir = Path(argv[0])
    world = join()
    try:
        work = json.loads((run_dir / LAUNCH_FILE).read_text())
        if world.is_main:
            _log_to_run(run_dir, work["command"])
        else:
            quiet_rank()
        return run_rank(work["command"], work["config"], run_dir)
    finally:
        leave()


def _log_to_run(run_dir: Path, command: str) -> None:
    """Rank 0 of a launched run logs to the console and appends to the run's log file, as the job did."""
    from .report import console_handler

    file_handler = logging.FileHandler(run_dir / f"{command}.log")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(console_handler())
    root.addHandler(file_handler)
