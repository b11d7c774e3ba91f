"""What this process may use of the machine: CPUs, memory, and giving freed memory back.

The limits that matter are the process's own, not the machine's: a container or a
``taskset``/cgroup quota can grant 2 CPUs of 64 and 4 GiB of 256. Thread counts are capped at
:func:`available_cpus` and allocations are checked against :func:`available_memory` before they
are made, so a large ``-t`` or ``-c`` gets a clear message instead of a machine that thrashes.
"""

from __future__ import annotations

import math
import os
import sys
from functools import lru_cache
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_cpu_limit() -> float | None:
    """CPUs granted by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None."""
    text = _read(_CGROUP / "cpu.max")
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_text = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us")
    period_text = _read(_CGROUP / "cpu" / "cpu.cfs_period_us")
    if quota_text and period_text and int(quota_text) > 0 and int(period_text) > 0:
        return int(quota_text) / int(period_text)
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota = _cgroup_cpu_limit()
    except ValueError:
        quota = None
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _meminfo_available() -> int | None:
    text = _read(Path("/proc/meminfo"))
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_memory_room() -> int | None:
    """Bytes left under a cgroup memory limit (v2 ``memory.max`` or v1), or None."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        limit = _read(_CGROUP / limit_file)
        if limit is None or limit == "max":
            continue
        usage = _read(_CGROUP / usage_file) or "0"
        try:
            limit_b, usage_b = int(limit), int(usage)
        except ValueError:
            continue
        if limit_b >= 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            continue
        return max(0, limit_b - usage_b)
    return None


def available_memory() -> int | None:
    """Bytes that can still be allocated without swapping or meeting the OOM killer: the
    smaller of the kernel's MemAvailable and the room under a cgroup limit (None if unknown)."""
    values = [v for v in (_meminfo_available(), _cgroup_memory_room()) if v is not None]
    return min(values) if values else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


@lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    import ctypes  # (with ctypes.util's subprocess and tempfile: only a server needs them)
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Hand memory that the allocator keeps after large frees back to the OS (glibc
    ``malloc_trim``); after a big request, RSS returns to what the process really holds.
    Returns whether anything was done."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)  # type: ignore[operator]
    return True


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024
