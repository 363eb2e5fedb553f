"""Offload: keep on the device only what the current computation needs (`attach_offload`, `open_offloaded`).

Modes (`--offload`): `none` keeps every expert on the device, `model` keeps one whole expert there at a time
(the other is released at the switch), `block` streams the transformer blocks through a few fixed device
buffers (`OffloadEngine`). Host RAM modes for `block` (`--ram_mode`): `pinned` (the model in host RAM,
page-locked up to a cap), `mmap` (read from the checkpoint per block; the page cache holds what RAM allows),
`disk` (per-block files in the runtime format, written once, read ahead by a thread).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wanlite.errors import WanliteError
from wanlite.offload.memory import return_large_frees_to_os, total_ram
from wanlite.offload.runner import Expert, OffloadEngine, Telemetry
from wanlite.offload.stores import DiskCache, FileStore, PinBudget, RamStore, pieces, source_fingerprint
from wanlite.offload.streams import Streams

__all__ = ["OffloadConfig", "OffloadEngine", "Telemetry", "attach_offload", "open_offloaded", "OFFLOAD_MODES",
           "RAM_MODES", "default_cache_dir", "load_merged_cached", "merges_into_quantized", "converts_on_load",
           "host_bytes"]

OFFLOAD_MODES = ("none", "model", "block")
RAM_MODES = ("pinned", "mmap", "disk")


@dataclass(frozen=True)
class OffloadConfig:
    """How the transformer(s) use the device; the planner fills it, `--offload` etc. override it."""

    mode: str = "model"
    resident_blocks: int = 0  # k: blocks kept on the device (the first k)
    prefetch: int = 1  # d: blocks copied ahead of the one computing
    ram_mode: str = "pinned"
    pin_fraction: float = 0.5  # of physical RAM at most page-locked (Windows refuses much more)
    cache_dir: Path | None = None  # disk mode; default: the user cache folder

    def __post_init__(self):
        if self.mode not in OFFLOAD_MODES:
            raise WanliteError(f"--offload {self.mode!r} is unknown; choose one of {', '.join(OFFLOAD_MODES)}")
        if self.ram_mode not in RAM_MODES:
            raise WanliteError(f"--ram_mode {self.ram_mode!r} is unknown; choose one of {', '.join(RAM_MODES)}")
        if self.resident_blocks < 0:
            raise WanliteError(f"--resident_blocks {self.resident_blocks} must be 0 or more")
        if self.prefetch < 0:
            raise WanliteError(f"--prefetch {self.prefetch} must be 0 or more")

    def describe(self) -> str:
        if self.mode != "block":
            return self.mode
        return f"block (k={self.resident_blocks}, d={self.prefetch}, ram={self.ram_mode})"


def default_cache_dir() -> Path:
    """Per-user cache: %LOCALAPPDATA%\\wanlite on Windows, $XDG_CACHE_HOME/wanlite or ~/.cache/wanlite elsewhere."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "wanlite" / "cache"
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "wanlite"


def _budget(config: OffloadConfig) -> PinBudget:
    return PinBudget(int(total_ram() * config.pin_fraction))


def attach_offload(models: dict[str, nn.Module], config: OffloadConfig, device,
                   telemetry: Telemetry | None = None, copy_on_host: bool = False,
                   streams: Streams | None = None) -> OffloadEngine:
    """Stream already-loaded DiT(s) (on the host, any weight format) block by block to `device`.

    Each model's weights move into per-piece host slabs (page-locked within the cap) and the models' tensors
    are re-pointed at them; `engine.activate(role)` returns a model ready to call. With `device="cpu"` the
    slabs are used in place (nothing to copy) unless `copy_on_host` asks for the device path's copies.
    `streams`: the stream API the copies run on (default: the device's; tests pass an emulator).

    Example:
        >>> engine = attach_offload({"main": dit}, OffloadConfig("block", resident_blocks=4, prefetch=2), "cuda")
        >>> out = engine.activate("main")(x, t, context)
    """
    return_large_frees_to_os()
    budget = _budget(config)
    experts = {role: Expert(model, RamStore(model, budget)) for role, model in models.items()}
    engine = OffloadEngine(experts, torch.device(device), config.resident_blocks, config.prefetch, telemetry,
                           copy_on_host, streams)
    engine.telemetry.pinned_bytes, engine.telemetry.pageable_bytes = budget.pinned, budget.pageable
    return engine


def open_offloaded(components: dict, task: str, dtype: torch.dtype, quant, config: OffloadConfig, device,
                   emit: Callable[[dict], None] = lambda e: None,
                   telemetry: Telemetry | None = None, copy_on_host: bool = False,
                   loras: dict | None = None, streams: Streams | None = None) -> OffloadEngine:
    """Open the task's expert(s) for block offload in `config.ram_mode`, never holding more of them in RAM
    than the mode allows (`pinned`: all of them; `mmap` / `disk`: a few blocks of one). The mode is taken as
    given (`resolve` chose it, fallbacks included). `loras`: role -> wanlite.lora.LoraSet, their modes as
    resolved (re-read blocks bind into fixed shells: `merge_outside_blocks`); `streams` as in `attach_offload`."""

    from wanlite.loading.models import DiTPieces, load_dit

    return_large_frees_to_os()
    ram_mode = config.ram_mode
    budget = _budget(config)
    experts = {}
    for role, comp in components.items():
        lora = (loras or {}).get(role)
        if ram_mode == "pinned":
            model = load_dit(comp, task, dtype, quant, lora)
            experts[role] = Expert(model, RamStore(model, budget))
            continue
        parts = DiTPieces(comp, task, dtype, quant, lora)
        staging = config.prefetch + 2
        if ram_mode == "mmap":
            experts[role] = Expert(parts.model, FileStore(parts.model, parts.load, staging, budget))
            continue
        cache = _disk_cache(config, comp, role, task, dtype, quant, lora)
        if not cache.valid(parts.model, parts.template, pieces(parts.num_blocks)):
            _check_disk_space(cache.folder, _stored_bytes(comp))
            emit({"event": "stage", "name": f"write offload cache ({role})", "path": str(cache.folder)})
            cache.write(parts.load, pieces(parts.num_blocks))
        for i, shell in cache.shells.items():
            parts.model.blocks[i] = shell
        experts[role] = Expert(parts.model, FileStore(parts.model, parts.load, staging, budget, cache))
    engine = OffloadEngine(experts, torch.device(device), config.resident_blocks, config.prefetch, telemetry,
                           copy_on_host, streams)
    engine.telemetry.pinned_bytes, engine.telemetry.pageable_bytes = budget.pinned, budget.pageable
    return engine


def merges_into_quantized(quant, lora) -> bool:
    """A LoRA merged before quantizing to one of wanlite's own formats: worth caching (merging into a 14B expert
    takes minutes), and the disk cache can hold the result."""
    return lora is not None and lora.mode != "runtime" and converts_on_load(quant)


def load_merged_cached(comp, role: str, task: str, dtype: torch.dtype, quant, lora, cache_dir: Path | None,
                       emit: Callable[[dict], None] = lambda e: None) -> nn.Module:
    """One expert with its LoRAs merged and then quantized, as `load_dit` gives it, from a disk cache keyed by
    the checkpoint, the format and the LoRA files and strengths (one folder per combination, so switching
    between LoRAs does not rebuild); the first run writes the cache piece by piece (one piece in RAM)."""
    from wanlite.lora import fingerprint
    from wanlite.loading.models import DiTPieces
    from wanlite.offload.slabs import bind
    from wanlite.offload.stores import shell_of

    parts = DiTPieces(comp, task, dtype, quant, lora)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "merged"
    cache = _disk_cache(OffloadConfig(cache_dir=root), comp, role, task, dtype, quant, lora)
    cache.folder = cache.folder.with_name(f"{cache.folder.name}-lora{fingerprint(lora)}")
    all_pieces = pieces(parts.num_blocks)
    if cache.valid(parts.model, parts.template, all_pieces):
        emit({"event": "stage", "name": f"load merged LoRA weights ({role}) from {cache.folder}"})
        lora.counts["merged"] = len(lora.targets())
        lora.counts["cached"] = True
    else:
        _check_disk_space(cache.folder, _stored_bytes(comp))
        emit({"event": "stage", "name": f"merge LoRA and quantize ({role}), cached in {cache.folder}"})
        cache.write(parts.load, all_pieces)
    for i, shell in cache.shells.items():
        parts.model.blocks[i] = shell
    for piece in all_pieces:
        layout = cache.layouts[piece]
        slab = torch.empty(layout.nbytes, dtype=torch.uint8)
        cache.read(piece, slab)
        bind(shell_of(parts.model, piece), layout, slab)
    return parts.model.eval().requires_grad_(False)


def converts_on_load(quant) -> bool:
    """True when loading quantizes (the weights are not read as stored): wanlite's own formats, which the disk
    cache can hold; torchao / quanto int8 tensors cannot be cached and stay on mmap."""
    from wanlite.quant import DenseConfig, Int8WeightConfig

    return quant is not None and not isinstance(quant, (DenseConfig, Int8WeightConfig))


def _stored_bytes(comp) -> int:
    return sum(Path(p).stat().st_size for p in comp.files)


def host_bytes(components: dict, task: str, quant) -> int:
    """Host RAM the experts' weights take held whole (pinned block offload): as stored, or quantized on load
    when that is smaller."""
    need = sum(_stored_bytes(comp) for comp in components.values())
    if quant is not None:
        need = min(need, sum(_quantized_bytes(comp, task, quant) for comp in components.values()))
    return need


def _quantized_bytes(comp, task: str, quant) -> int:
    from wanlite.loading.models import prepare_dit
    from wanlite.quant import FORMATS, weight_bytes

    name = quant.name
    fmt = ("bf16" if name == "none" else "fp8" if name.startswith("fp8") else "int8" if name.startswith("int8")
           else name.removeprefix("gguf-").upper())
    if fmt not in FORMATS:
        return _stored_bytes(comp)
    manifest = {k: tuple(v.shape) for k, v in prepare_dit(comp, task).model.state_dict().items()}
    return weight_bytes(manifest, fmt)


def _disk_cache(config: OffloadConfig, comp, role: str, task: str, dtype: torch.dtype, quant,
                lora=None) -> DiskCache:
    from wanlite.lora import fingerprint

    root = Path(config.cache_dir) if config.cache_dir is not None else default_cache_dir() / "offload"
    where = hashlib.sha256("|".join(str(Path(p).resolve()) for p in comp.files).encode()).hexdigest()[:12]
    fingerprint = source_fingerprint(list(comp.files), {"task": task, "role": role, "dtype": str(dtype),
                                                         "quant": None if quant is None else quant.name,
                                                         "lora": fingerprint(lora)})
    return DiskCache(root / f"{task}-{role}-{where}", fingerprint)


def _check_disk_space(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise WanliteError(f"--ram_mode disk needs up to {need / 1e9:.1f} GB for its cache in {folder} but only "
                           f"{free / 1e9:.1f} GB are free; free space, point --offload_cache elsewhere, or use "
                           "--ram_mode mmap")
