"""Process memory as the OS reports it (psutil, so the same numbers on Windows and Linux)."""
from __future__ import annotations

import ctypes
import sys

import psutil


def rss_bytes() -> int:
    """Resident set size now; on Windows the peak working set, which the OS tracks for us."""
    info = psutil.Process().memory_info()
    return max(info.rss, getattr(info, "peak_wset", 0))


def available_ram() -> int:
    return psutil.virtual_memory().available


def total_ram() -> int:
    return psutil.virtual_memory().total


_heap_fixed = False


def return_large_frees_to_os(threshold: int = 4 << 20) -> None:
    """Make glibc give every freed allocation of `threshold` bytes or more straight back to the OS.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so the next tensors of
    that size come from the heap, which is rarely trimmed: streaming a 14B model block by block then grows
    RSS by gigabytes of freed-but-kept memory (measured: 11 GB after one forward, 2.5 GB with this). A fixed
    threshold turns that off. Other C libraries (Windows, macOS) already return large frees; nothing to do.
    """
    global _heap_fixed
    if _heap_fixed or not sys.platform.startswith("linux"):
        return
    _heap_fixed = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (setting it also disables the dynamic adjustment)
    except (OSError, AttributeError):
        pass  # not glibc (e.g. musl): no dynamic threshold to fix
