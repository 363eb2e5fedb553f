"""PlacedExperts: a task's DiT expert(s), loaded and placed on the device the way an OffloadConfig says."""
from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from wanlite.loading.models import load_dit
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
    expert (the other is released at the switch, so both are never resident), `block` streams blocks through
    the offload engine. Every choice comes from the config; nothing is decided here."""

    def __init__(self, components: dict, task: str, dtype: torch.dtype, device: torch.device, quant,
                 offload: OffloadConfig, telemetry: Telemetry, emit: Callable[[dict], None],
                 chunk_tokens: int | None = None, cache=None, loras: dict | None = None):
        self.components, self.task, self.dtype, self.device = components, task, dtype, device
        self.quant, self.offload, self.telemetry, self.emit = quant, offload, telemetry, emit
        self.chunk_tokens = chunk_tokens
        self.cache = cache  # wanlite.cache.StepCache | None: put in front of each expert's block loop
        self.loras = loras or {}  # role -> wanlite.lora.LoraSet, applied as each expert loads
        self.models: dict[str, torch.nn.Module] = {}
        self.engine = None

    def set_schedule(self, schedule: list[str]) -> None:
        """The experts of the coming denoising run (S2V: one run per clip; the engine opens once)."""
        if self.offload.mode != "block":
            return
        if self.engine is None:
            self.engine = open_offloaded(self.components, self.task, self.dtype, self.quant, self.offload,
                                         self.device, self.emit, self.telemetry, loras=self.loras)
            for role, expert in self.engine.experts.items():
                expert.model.chunk_tokens = self.chunk_tokens
                if self.cache is not None:
                    self.cache.attach(expert.model, role)
        self.engine.set_schedule(schedule)

    def __call__(self, role: str) -> torch.nn.Module:
        if self.engine is not None:
            return self.engine.activate(role)
        if role not in self.models:
            if self.offload.mode == "model":
                self._release_models()  # one expert at a time
            lora = self.loras.get(role)
            if merges_into_quantized(self.quant, lora):  # minutes of merging: done once, then read back
                model = load_merged_cached(self.components[role], role, self.task, self.dtype, self.quant, lora,
                                           self.offload.cache_dir, self.emit).to(self.device)
            else:
                model = load_dit(self.components[role], self.task, self.dtype, self.quant, lora).to(self.device)
            model.chunk_tokens = self.chunk_tokens
            self.telemetry.bytes_moved += sum(t.nbytes for t in model.state_dict().values())
            if self.cache is not None:
                self.cache.attach(model, role)
            self.models[role] = model
        return self.models[role]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.detach()
        if self.engine is not None:
            self.engine.finish()
            self.engine = None
        self._release_models()

    def _release_models(self) -> None:
        release(*self.models.values())
        self.models.clear()
