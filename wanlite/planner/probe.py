"""Measure the machine once (`wanlite profile`): GPU, VRAM, RAM, pinnable memory, host->device bandwidth, disk
read speed, and which fast kernels exist. Cached per machine in the user cache folder; `--refresh` re-measures.

A `Hardware` can also be hypothetical (`wanlite plan --vram 12 --ram 32`): then the GPU is assumed to be the
consumer card of that size (the `ASSUMED_GPUS` table) and every figure says it was assumed.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wanlite.offload.memory import available_ram, total_ram

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """What the planner needs to know about a machine (bytes, bytes/s, FLOP/s)."""

    gpu: str | None  # None: no CUDA GPU, the plan runs on the CPU
    vram_total: int = 0
    vram_free: int = 0
    compute_capability: tuple[int, int] | None = None
    ram_total: int = 0
    ram_available: int = 0
    pin_limit: int = 0  # host bytes that may be page-locked
    h2d_pinned: float = 0.0  # bytes/s
    h2d_pageable: float = 0.0
    disk_read: float = 0.0  # bytes/s of the checkpoint's drive (0: not measured)
    bf16_flops: float = 0.0  # sustained dense bf16 matmul FLOP/s
    fp8_matmul: bool = False  # torch._scaled_mm usable (sm >= 8.9)
    flash_attention: bool = False  # SDPA's flash kernel usable (sm >= 8.0)
    measured: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        data = dict(data)
        if data.get("compute_capability") is not None:
            data["compute_capability"] = tuple(data["compute_capability"])
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    def describe(self) -> str:
        where = "measured" if self.measured else "assumed"
        if self.gpu is None:
            return f"CPU only, {self.ram_total / GB:.0f} GB RAM ({where})"
        return (f"{self.gpu}, {self.vram_total / GB:.0f} GB VRAM, {self.ram_total / GB:.0f} GB RAM, "
                f"PCIe {self.h2d_pinned / GB:.0f} GB/s pinned ({where})")


# Hypothetical GPUs by VRAM size (`--vram N` without `--gpu`): the usual consumer card of that size.
ASSUMED_GPUS = {8: "RTX 4060", 12: "RTX 4070", 16: "RTX 4080", 24: "RTX 4090"}


def hypothetical(vram_gb: float | None, ram_gb: float, disk_gbps: float = 2.0, gpu: str | None = None) -> Hardware:
    """A machine described by its card (`--gpu NAME`, from `wanlite.planner.gpus`) or its sizes (`--vram`,
    `--ram`); `vram_gb` given with a card overrides its VRAM; no card and `vram_gb=None` or 0 means no GPU."""
    from wanlite.planner.gpus import PCIE, card

    ram = int(ram_gb * GB)
    if gpu is None and not vram_gb:
        return Hardware(None, ram_total=ram, ram_available=int(ram_gb * 0.85 * GB),
                        disk_read=disk_gbps * GB, bf16_flops=0.5e12, measured=False)
    if gpu is not None:
        found = card(gpu)
        vram_gb = vram_gb or found.vram_gb
        name, note = found.name, f"GPU figures from wanlite's table for the {found.name}"
    else:
        size = min(ASSUMED_GPUS, key=lambda s: abs(s - vram_gb))
        found = card(ASSUMED_GPUS[size])
        name = f"{found.name} (assumed)" if size == vram_gb else f"{vram_gb:g} GB GPU (assumed like the {found.name})"
        note = "GPU figures assumed from its VRAM size"
    pinned, pageable = PCIE[found.pcie]
    return Hardware(name, vram_total=int(vram_gb * GB), vram_free=int((vram_gb - 0.6) * GB), compute_capability=found.cc,
                    ram_total=ram, ram_available=int(ram * 0.85), pin_limit=int(ram * 0.5),
                    h2d_pinned=pinned, h2d_pageable=pageable, disk_read=disk_gbps * GB,
                    bf16_flops=found.half_tflops * 1e12, fp8_matmul=found.fp8, flash_attention=found.cc >= (8, 0),
                    measured=False, notes=(note,))


def _bandwidth(src: torch.Tensor, device: torch.device, repeats: int = 3) -> float:
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return src.numel() * repeats / (time.perf_counter() - start)


def _matmul_flops(device: torch.device) -> float:
    n = 4096 if device.type == "cuda" else 1024  # a CPU without bf16 units needs minutes for 4096^3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (a @ b).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    repeats = 10 if device.type == "cuda" else 1
    for _ in range(repeats):
        c = a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del c
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def disk_read_speed(folder: Path, nbytes: int = 256 << 20) -> float:
    """Bytes/s reading a fresh file on `folder`'s drive. The OS may still serve part of it from its cache, so
    this is an upper bound; the planner uses it only to rank mmap/disk modes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    fd, name = tempfile.mkstemp(dir=folder, prefix="wanlite-disk-probe-")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass
        return nbytes / (time.perf_counter() - start)
    finally:
        os.unlink(name)


def probe(disk_folder: Path | None = None) -> Hardware:
    """Measure this machine (a few seconds; cached by `load_or_probe`)."""
    notes = []
    ram = total_ram()
    disk = disk_read_speed(disk_folder) if disk_folder is not None else 0.0
    if not torch.cuda.is_available():
        return Hardware(None, ram_total=ram, ram_available=available_ram(), disk_read=disk,
                        bf16_flops=_matmul_flops(torch.device("cpu")),
                        notes=("no CUDA GPU: wanlite runs on the CPU (slow; fine for the bundled tiny model)",))
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    cc = (props.major, props.minor)
    test = min(256 << 20, free // 8)
    pageable = torch.empty(test, dtype=torch.uint8)
    try:
        pinned = torch.empty(test, dtype=torch.uint8, pin_memory=True)
        h2d_pinned = _bandwidth(pinned, device)
        pin_limit = int(ram * (0.5 if platform.system() == "Windows" else 0.75))
    except RuntimeError:
        h2d_pinned, pin_limit = 0.0, 0
        notes.append("the OS refused to page-lock 256 MB: transfers use pageable memory")
    h2d_pageable = _bandwidth(pageable, device)
    from wanlite.planner.gpus import find_card

    known = find_card(props.name)
    if known is not None:
        notes.append(f"the {known.name}: {known.half_tflops:g} TFLOPS {'bf16' if known.bf16 else 'fp16'} dense on "
                     f"paper, {known.mem_gbs:g} GB/s memory")
    if cc < (8, 0):
        notes.append(f"compute capability {cc[0]}.{cc[1]} has no bf16 units: wanlite computes in fp16 here")
    return Hardware(props.name, vram_total=total, vram_free=free, compute_capability=cc, ram_total=ram,
                    ram_available=available_ram(), pin_limit=pin_limit, h2d_pinned=h2d_pinned,
                    h2d_pageable=h2d_pageable, disk_read=disk, bf16_flops=_matmul_flops(device),
                    fp8_matmul=cc >= (8, 9) and hasattr(torch, "_scaled_mm"),
                    flash_attention=cc >= (8, 0), notes=tuple(notes))


def cache_file() -> Path:
    from wanlite.offload import default_cache_dir

    key = f"{platform.node()}-{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)
    return default_cache_dir() / "hardware" / f"{safe}.json"


def load_or_probe(refresh: bool = False, disk_folder: Path | None = None) -> Hardware:
    """The cached measurement of this machine, measuring (and caching, temp file + rename) when missing."""
    path = cache_file()
    if not refresh and path.is_file():
        try:
            return Hardware.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            pass  # an old or damaged cache: measure again
    hw = probe(disk_folder if disk_folder is not None else path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(hw.to_dict(), indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return hw
