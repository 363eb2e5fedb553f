"""The models generations load, kept between the generations of a `Pipeline` as each job's `KeepPlan` says.

Each component is held with the job fields it was loaded for; a later job asking for something else gets
it loaded again, and an event saying which field changed. A one-shot generation's jobs keep nothing, so
every component is released after its stage, as the plan's memory assumes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from wanlite.loading.checkpoints import CheckpointSet
from wanlite.loading.models import expert_components, load_t5, load_vae
from wanlite.loading.progress import reading
from wanlite.lora import lora_set
from wanlite.offload.experts import PlacedExperts, release
from wanlite.pipelines.job import DTYPES, Job
from wanlite.quant import parse_quant

Progress = Callable[[dict], None]


class Components:
    """`text_encoder(...)` and `vae(...)` lend a component on the device for a `with` block; `transformer(...)`
    returns the placed experts. `loads` counts how often each was read from its files."""

    def __init__(self):
        self.loads: Counter = Counter()
        self.text: tuple[dict, object] | None = None  # (what it was loaded for, TextEncoder)
        self.vaes: dict[str, tuple[dict, torch.nn.Module]] = {}  # by dtype
        self.experts: tuple[dict, PlacedExperts] | None = None
        self.decode_steps: dict[tuple, float] = {}  # a decode's measured time in denoising steps, by video shape

    @contextmanager
    def text_encoder(self, job: Job, ckpt: CheckpointSet, text_len: int, emit: Progress) -> Iterator:
        from wanlite.models.t5 import TextEncoder, load_tokenizer

        device = torch.device(job.text_encoder.device)
        key = {"text encoder file": [str(f) for f in ckpt.t5.files], "tokenizer": str(ckpt.tokenizer),
               "dtype": job.dtype, "quant": job.text_encoder.quant, "quant backend": job.weights.quant_backend}
        if self.text is not None and self.text[0] != key:
            emit(reload_event("text encoder", self.text[0], key))
            self.drop_text_encoder()
        if self.text is None:
            quant = parse_quant(job.text_encoder.quant, job.weights.quant_backend)
            with reading("text encoder", ckpt.t5.files, emit):
                model = load_t5(ckpt.t5, DTYPES[job.dtype], quant)
            if job.parallel is not None and job.parallel.t5_fsdp:  # each GPU keeps 1/N of every block's weights
                from wanlite.parallel import shard_blocks

                model = shard_blocks(model.to(device), model.encoder.block)
            self.loads["text encoder"] += 1
            self.text = (key, TextEncoder(load_tokenizer(ckpt.tokenizer), model, text_len=text_len))
        encoder = self.text[1]
        encoder.text_len = text_len
        encoder.model.to(device)
        try:
            yield encoder
        finally:
            self._put_back(job.keep.text_encoder, encoder.model, self.drop_text_encoder)

    @contextmanager
    def vae(self, job: Job, ckpt: CheckpointSet, task: str, dtype: torch.dtype, device: torch.device,
            emit: Progress) -> Iterator:
        name = str(dtype).removeprefix("torch.")
        key = {"VAE file": [str(f) for f in ckpt.vae.files]}
        held = self.vaes.get(name)
        if held is not None and held[0] != key:
            self.drop_vaes()
            held = None
        if held is None:
            with reading("VAE", ckpt.vae.files, emit):
                model = load_vae(ckpt.vae, task, dtype)
            self.loads["VAE"] += 1
            held = self.vaes[name] = (key, model)
        model = held[1].to(device)
        try:
            yield model
        finally:
            self._put_back(job.keep.vae, model, lambda: self.drop_vae(name))

    def transformer(self, job: Job, ckpt: CheckpointSet, task: str, emit: Progress) -> PlacedExperts:
        """The task's experts as the job places them, with its LoRAs (read when the experts load)."""
        key = {"transformer files": [str(f) for c in expert_components(ckpt, task).values() for f in c.files],
               "quant": job.weights.quant, "quant backend": job.weights.quant_backend, "dtype": job.dtype,
               "device": job.device, "offload": job.offload.describe(), "LoRAs": [
                   (p.role, p.files, p.mode, p.merge_outside_blocks) for p in job.loras],
               "keep": job.keep.transformer, "compile": job.compile, "parallel": job.parallel}
        if self.experts is not None and self.experts[0] != key:
            emit(reload_event("transformer", self.experts[0], key))
            self.drop_transformer()
        if self.experts is None:
            experts = expert_components(ckpt, task)
            loras = {p.role: lora_set(p.files, experts[p.role], p.role, task, p.mode,
                                      merge_outside_blocks=p.merge_outside_blocks) for p in job.loras}
            shard = None
            if job.parallel is not None and job.parallel.dit_fsdp:
                from wanlite.parallel import shard_blocks

                shard = lambda model: shard_blocks(model, model.blocks)  # noqa: E731
            self.experts = (key, PlacedExperts(experts, task, DTYPES[job.dtype], torch.device(job.device),
                                               parse_quant(job.weights.quant, job.weights.quant_backend),
                                               job.offload, loras, job.keep.transformer, self.loads, shard))
        return self.experts[1]

    def _put_back(self, keep: str, model: torch.nn.Module, drop: Callable[[], None]) -> None:
        if keep == "none":
            drop()
        elif keep == "host":
            model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def drop_text_encoder(self) -> None:
        if self.text is not None:
            release(self.text[1].model)
            self.text = None

    def drop_vae(self, name: str) -> None:
        held = self.vaes.pop(name, None)
        if held is not None:
            release(held[1])

    def drop_vaes(self) -> None:
        release(*(model for _, model in self.vaes.values()))
        self.vaes.clear()

    def drop_transformer(self) -> None:
        if self.experts is not None:
            self.experts[1].close()
            self.experts = None

    def close(self) -> None:
        """Free everything (the pipeline's `close`)."""
        self.drop_transformer()
        self.drop_text_encoder()
        self.drop_vaes()


def reload_event(what: str, before: dict, now: dict) -> dict:
    changed = [name for name in now if before.get(name) != now[name]]
    return {"event": "reload", "what": what, "changed": changed,
            "message": f"loading the {what} again: its {', '.join(changed)} changed"}
