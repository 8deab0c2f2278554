"""Sizes this machine cannot hold, refused with a message before the allocation is tried.

An absurd size (a config with a billion layers, a dataset option asking for 100000x100000 images) would
otherwise run for minutes and end in a MemoryError traceback, or be killed by the kernel. Each place that
allocates in proportion to a user's number estimates the bytes first and calls `check_memory` (or
`check_disk` for files). Only what cannot fit is refused: the estimates are lower bounds.

The memory available is detected here and nowhere else: on the host, the smaller of the kernel's MemAvailable
and the cgroup's limit less its usage (containers); on a CUDA device, its free memory. IMAGEGPT_MEMORY_BYTES
overrides both (tests, or a share of a shared machine).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import ResourceError

MEMORY_ENV = "IMAGEGPT_MEMORY_BYTES"


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.0f} bytes" if power == 0 else f"{n:.1f} {units[power]}"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        total = _read_int(limit)
        if total is not None and total < 1 << 60:  # v1 reports "no limit" as a huge number
            return max(0, total - (_read_int(usage) or 0))
    return None


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def available_memory(device=None) -> int | None:
    """Bytes this process can still allocate on the host, or on `device` when it is a CUDA device (None when
    the platform does not say)."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise ResourceError(f"{MEMORY_ENV}={override!r} is not a number of bytes") from None
    if _is_cuda(device):
        return int(torch.cuda.mem_get_info(device)[0])
    known = [v for v in (_mem_available(), _cgroup_room()) if v is not None]
    return min(known) if known else None


def check_memory(nbytes: float, what: str, hint: str = "", device=None) -> None:
    """ResourceError when `what` needs more than the memory available (on `device` when it is a CUDA device,
    else on the host); hint says what to change."""
    available = available_memory(device)
    if available is not None and nbytes > available:
        where = f"{device} has" if _is_cuda(device) else "this machine has"
        raise ResourceError(
            f"{what} needs at least {format_bytes(nbytes)} of memory, but {where} "
            f"{format_bytes(available)} available" + (f"; {hint}" if hint else "")
        )


def check_disk(nbytes: float, directory: str | os.PathLike, what: str, hint: str = "") -> None:
    """ResourceError when `what` needs more bytes than the disk holding `directory` has free."""
    folder = Path(directory).expanduser()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if nbytes > free:
        raise ResourceError(
            f"{what} needs {format_bytes(nbytes)} of disk space in {directory}, but only "
            f"{format_bytes(free)} is free" + (f"; {hint}" if hint else "")
        )
