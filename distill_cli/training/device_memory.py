"""The memory a device has free for training now, and byte counts as a person reads them (in the one-line
refusals of a method that would not fit, and in the fused memory plan's log line)."""

from __future__ import annotations

import os

import torch

GIB = 2**30


def available_bytes(device: torch.device) -> int:
    """The memory free for training on `device` now: on CUDA the device's free memory and what torch's
    allocator holds unused; elsewhere the system's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_ram()


def available_ram() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def byte_size(count: float) -> str:
    """A byte count in TiB, GiB, MiB or KiB, one decimal."""
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"
