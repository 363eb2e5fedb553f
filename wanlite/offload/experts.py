"""PlacedExperts: a task's DiT expert(s), loaded and placed on the device the way an OffloadConfig says."""
from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable

import torch

from wanlite.loading.models import load_dit
from wanlite.loading.progress import reading
from wanlite.offload import OffloadConfig, Telemetry, load_merged_cached, merges_into_quantized, open_offloaded


def release(*models) -> None:
    """Drop the last references and give the memory back before the next component needs it."""
    for m in models:
        if m is not None:
            m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PlacedExperts:
    """`self(role)` returns the expert ready to run. `none` keeps every expert on the device, `model` one whole
    expert (the other waits in RAM when `keep` is "host", else is released at the switch, so both are never
    on the device), `block` streams blocks through the offload engine. Between generations (`park`) the
    experts stay on the device, wait in RAM or are released, as `keep` says. Every choice comes from the job;
    nothing is decided here."""

    def __init__(self, components: dict, task: str, dtype: torch.dtype, device: torch.device, quant,
                 offload: OffloadConfig, loras: dict | None = None, keep: str = "none",
                 loads: Counter | None = None, shard: Callable | None = None):
        self.components, self.task, self.dtype, self.device = components, task, dtype, device
        self.quant, self.offload, self.keep = quant, offload, keep
        self.loras = loras or {}  # role -> wanlite.lora.LoraSet, applied as each expert loads
        self.loads = loads if loads is not None else Counter()  # component -> times loaded
        self.models: dict[str, torch.nn.Module] = {}
        self.on_device: set[str] = set()
        self.engine = None
        self.telemetry, self.emit, self.cache, self.chunk_tokens = Telemetry(), (lambda event: None), None, None
        self.rows_apart = self.compile = False
        self.shard = shard  # several GPUs with --dit_fsdp: spreads a loaded expert's weights over them
        self.parallel = None  # several GPUs: the sequence-parallel seam each expert runs with (wanlite.parallel)

    def start(self, telemetry: Telemetry, emit: Callable[[dict], None], cache=None,
              chunk_tokens: int | None = None, rows_apart: bool = False, compile: bool = False,
              parallel=None) -> None:
        """A generation begins: what it counts, where its events go, its step cache (put in front of each
        expert's block loop), the token chunks its blocks work in, whether CFG runs per block, whether the
        blocks run compiled and, on several GPUs, this rank's sequence-parallel seam."""
        telemetry.pinned_bytes, telemetry.pageable_bytes = self.telemetry.pinned_bytes, self.telemetry.pageable_bytes
        self.telemetry, self.emit, self.cache, self.chunk_tokens = telemetry, emit, cache, chunk_tokens
        self.rows_apart, self.compile, self.parallel = rows_apart, compile, parallel
        for s in self.loras.values():
            s.gain = 1.0  # a preset's phases turn it down and up within a generation
        models = self.models if self.engine is None else {r: e.model for r, e in self.engine.experts.items()}
        for role, model in models.items():
            self._prepare(model, role)
        if self.engine is not None:
            self.engine.telemetry = telemetry

    def _prepare(self, model: torch.nn.Module, role: str) -> None:
        model.chunk_tokens, model.rows_apart, model.sequence_parallel = self.chunk_tokens, self.rows_apart, self.parallel
        if self.compile:  # each block alone: the runners (offload, step cache) call them from outside
            for block in model.blocks:
                if block._compiled_call_impl is None:  # once: a kept model keeps its compiled blocks
                    block.compile(dynamic=False)
        if self.cache is not None:
            self.cache.attach(model, role)

    def set_schedule(self, schedule: list[str]) -> None:
        """The experts of the coming denoising run (S2V: one run per clip; the engine opens once)."""
        if self.offload.mode != "block":
            return
        if self.engine is None:
            files = [f for comp in self.components.values() for f in comp.files]
            reads = self.offload.ram_mode == "pinned"  # mmap and disk read blocks as they run
            with reading("transformer", files if reads else [], self.emit if reads else (lambda event: None)):
                self.engine = open_offloaded(self.components, self.task, self.dtype, self.quant, self.offload,
                                             self.device, lambda event: self.emit(event), self.telemetry,
                                             loras=self.loras)
            self.loads.update(f"transformer ({role})" for role in self.components)
            for role, expert in self.engine.experts.items():
                self._prepare(expert.model, role)
        self.engine.set_schedule(schedule)

    def loads_at_switch(self, schedule: list[str]) -> bool:
        """Whether a later expert of `schedule` is read from its files when the run switches to it."""
        return self.engine is None and any(role not in self.models for role in schedule)

    def __call__(self, role: str) -> torch.nn.Module:
        if self.engine is not None:
            return self.engine.activate(role)
        if role not in self.on_device:
            if self.offload.mode == "model":
                self._leave_device(keep_host=self.keep != "none")  # one expert on the device at a time
            if role in self.models:
                self.models[role].to(self.device)
            else:
                self.models[role] = self._load(role)
            self.telemetry.bytes_moved += sum(t.nbytes for t in self.models[role].state_dict().values())
            self.on_device.add(role)
        return self.models[role]

    def _load(self, role: str) -> torch.nn.Module:
        comp, lora = self.components[role], self.loras.get(role)
        with reading(f"transformer ({role.replace('_', ' ')})", comp.files, self.emit):
            if merges_into_quantized(self.quant, lora):  # minutes of merging: done once, then read back
                model = load_merged_cached(comp, role, self.task, self.dtype, self.quant, lora,
                                           self.offload.cache_dir, self.emit)
            else:
                model = load_dit(comp, self.task, self.dtype, self.quant, lora)
        self.loads[f"transformer ({role})"] += 1
        model = model.to(self.device)
        if self.shard is not None:
            model = self.shard(model)
        self._prepare(model, role)
        return model

    def park(self) -> None:
        """Denoising is over: the step cache comes off, and the experts go where `keep` says (the VAE decode
        needs the memory next)."""
        if self.cache is not None:
            self.cache.detach()
            self.cache = None
        if self.engine is not None:
            if self.keep == "none":
                self.close()
            else:
                self.engine.park()
            return
        if self.keep == "none":
            self.close()
        elif self.keep == "host":
            self._leave_device(keep_host=True)

    def _leave_device(self, keep_host: bool) -> None:
        if keep_host:
            for role in self.on_device:
                self.models[role].to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            self._release_models()
        self.on_device.clear()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.detach()
            self.cache = None
        if self.engine is not None:
            self.engine.finish()
            self.engine = None
        self._release_models()

    def _release_models(self) -> None:
        release(*self.models.values())
        self.models.clear()
        self.on_device.clear()
