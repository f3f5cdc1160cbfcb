"""Data-parallel training with torch.distributed: this process's place among the training processes
(`World`) and what they do together (collectives on objects and tensors, one-line errors across ranks).

In training (`training.loop.fit`) each rank takes its slice of every global batch (loaders:
`Loader(shard=...)`), the student is wrapped in DistributedDataParallel and a KD method's trainable parts
have their gradients averaged (`training.data_parallel`), epoch metrics are summed over ranks, and rank 0
alone reads and writes files; what other ranks need from a file (a checkpoint to resume, a teacher) rank 0
broadcasts (`World.on_main`), so ranks on other nodes need no shared filesystem, only the data. A method
that keeps state across the batch (CRD's memory banks) gathers what it needs (`World.gathered`). How the
processes are started is the CLI's (`cli/torchrun.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistillError
from .processes import torchrun_world_size

T = TypeVar("T")


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

    def gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` of every rank (the same shape on each), concatenated along its first axis in rank order
        (detached); `tensor` itself alone."""
        if not self.distributed or self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        return torch.cat(parts)

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


def join() -> World:
    """Join the process group torchrun set up (gloo for CPU tensors, NCCL for CUDA ones when there is a
    GPU) and return this process's `World`; SINGLE when torchrun did not start this process."""
    global _world
    if not torchrun_world_size():
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
