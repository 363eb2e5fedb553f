"""Process memory as the OS reports it (psutil, so the same numbers on Windows and Linux)."""
from __future__ import annotations

import psutil


def rss_bytes() -> int:
    """Resident set size now; on Windows the peak working set, which the OS tracks for us."""
    info = psutil.Process().memory_info()
    return max(info.rss, getattr(info, "peak_wset", 0))


def available_ram() -> int:
    return psutil.virtual_memory().available


def total_ram() -> int:
    return psutil.virtual_memory().total
