"""The Job: every decision about one generation, made once by `resolve` and executed as is.

A Job is plain frozen data. `wanlite plan` prints it, `plan --save` writes its choices as a profile that
resolves to the same Job, the mp4 records it (`wanlite info FILE --json`), and `execute` runs it without
deciding anything again: no engine falls back, re-plans or switches modes on its own.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from wanlite.cache.config import CacheConfig, describe
from wanlite.offload import OffloadConfig
from wanlite.pipelines.request import Settings
from wanlite.planner.plan import Prediction, profile_toml

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Weights:
    """Where the model files are and the format the transformer(s) run in."""

    ckpt_dir: str | None
    files: tuple[tuple[str, str], ...]  # (component flag, path) overriding what ckpt_dir provides
    quant: str  # the --quant value the transformer(s) load with; "auto": as the files store them
    quant_backend: str  # int8 only
    stored_quantized: bool  # the transformer files already hold fp8 / int8 / GGUF blocks


@dataclass(frozen=True)
class LoraPlan:
    """The LoRAs of one expert and how they apply: `merge` into the weights as they load, `runtime` branches,
    or `auto` (files stored quantized: merged into the dense tensors, a branch on the quantized ones)."""

    role: str
    files: tuple[tuple[str, float], ...]  # (path, strength)
    mode: str
    merge_outside_blocks: bool = False  # offload that re-reads blocks keeps the rest merged, blocks branched


@dataclass(frozen=True)
class TextEncoderPlan:
    device: str
    quant: str  # as the transformer (fp8 / int8 apply to umT5 too; GGUF and "auto" keep it as stored)


@dataclass(frozen=True)
class VaePlan:
    dtype: str  # fp32 (official) | bf16
    tile: int | None  # latent pixels per spatial tile; None: whole frames
    overlap: int | None  # latent pixels neighbouring tiles share


@dataclass(frozen=True)
class PromptExtendPlan:
    """`--use_prompt_extend`: a chat model rewrites the prompt before anything else runs
    (`wanlite.pipelines.prompt_extend.extend_job`). Before the run `original_prompt` is None and the settings
    hold the user's prompt; after it the settings hold the prompt the video was made from and `original_prompt`
    the one the user typed, so the mp4 records both and `--replay` uses the rewritten one as it is."""

    method: str  # local_qwen | dashscope
    model: str  # local_qwen: a folder or a Hugging Face repo id; dashscope: the hosted model's name
    target_lang: str  # zh | en
    vision: bool  # the image goes with the prompt (a Qwen-VL model)
    device: str = ""  # local_qwen: cuda | cpu (the plan's); dashscope: ""
    quant: str = ""  # local_qwen: its decoder layers' --quant (none, int8, gguf-q4_k); dashscope: ""
    fallback: bool = False  # --prompt_extend_fallback: a failed rewrite warns and keeps the user's prompt
    timeout_s: float = 60.0  # dashscope: seconds to wait for the answer
    max_new_tokens: int = 512  # local_qwen: the rewrite's length limit (greedy decoding)
    original_prompt: str | None = None  # filled once the rewrite has run
    error: str | None = None  # why the rewrite failed when --prompt_extend_fallback kept the original


@dataclass(frozen=True)
class ParallelPlan:
    """Several GPUs under torchrun (wanlite.parallel): the DiT's tokens split over `ranks` (Ulysses); `dit_fsdp`
    / `t5_fsdp` shard the transformer's / text encoder's weights over them (FSDP2). Rank 0 writes the video."""

    ranks: int
    dit_fsdp: bool = False
    t5_fsdp: bool = False


KEEP_PLACES = ("device", "host", "none")


@dataclass(frozen=True)
class KeepPlan:
    """Where each component waits between the generations of a `Pipeline` (`wanlite.load`): on the device,
    in host RAM (moved to the device when used), or nowhere (loaded again when next needed). A one-shot
    generation keeps nothing, so its memory is the plan's."""

    text_encoder: str = "none"
    transformer: str = "none"
    vae: str = "none"


@dataclass(frozen=True)
class Job:
    """What `execute` runs. Everything a later stage needs to know is here; nothing is decided after it."""

    settings: Settings
    device: str
    dtype: str
    weights: Weights
    offload: OffloadConfig
    chunk_tokens: int | None  # DiT blocks work this many tokens at a time (None: whole)
    step_cache: CacheConfig | None
    loras: tuple[LoraPlan, ...]
    text_encoder: TextEncoderPlan
    vae: VaePlan
    attention: str  # the attention kernel (wanlite.models.attention.BACKENDS)
    wav2vec: str | None = None  # S2V: the wav2vec2 folder
    machine: str = ""  # what the plan was made for
    predicted: Prediction | None = None  # the planner's peak VRAM / RAM and s/step (None: the tiny tasks)
    reasons: tuple[str, ...] = ()  # why the planner chose what it chose
    warnings: tuple[str, ...] = field(default=())  # fallbacks resolve took; shown when the job runs
    keep: KeepPlan = KeepPlan()
    cfg: str = "batched"  # batched: cond + uncond as one batch; per_block: through each block one after the other
    compile: bool = False  # each DiT block through torch.compile (the offload and cache runners stay outside)
    prompt_extend: PromptExtendPlan | None = None  # --use_prompt_extend (None: the prompt is used as typed)
    parallel: ParallelPlan | None = None  # several GPUs (None: one)

    def to_dict(self) -> dict:
        """JSON-ready: the same dict in `plan --json` and in the mp4's metadata."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def profile_toml(self) -> str:
        """A profile (`--profile FILE`) whose choices resolve to this job's on any machine."""
        from wanlite.cache import PRESETS

        cache = "off" if self.step_cache is None else next(
            (name for name, preset in PRESETS.items() if preset == self.step_cache), None)
        if cache is None:  # a tuned policy: its name; the flags that tuned it go with the command
            cache = {"magcache": "mag"}.get(describe(self.step_cache)["policy"], describe(self.step_cache)["policy"])
        o, s = self.offload, self.settings
        choices = {"quant": self.weights.quant, "offload": o.mode, "resident_blocks": o.resident_blocks,
                   "prefetch": o.prefetch, "ram_mode": o.ram_mode, "chunk_tokens": self.chunk_tokens or 0,
                   "t5_device": "cpu" if self.text_encoder.device == "cpu" else "cuda",
                   "vae_tile": self.vae.tile or 0, "cache": cache, "cfg": self.cfg}
        return profile_toml(choices, [f"wanlite profile saved from the job for {s.task} {s.size[0]}*{s.size[1]}, "
                                      f"{s.frames} frames on {self.machine}", self.summary(),
                                      *(f"why: {r}" for r in self.reasons)])

    def summary(self) -> str:
        """One line: format, placement, text encoder, VAE, step cache and the prediction."""
        o = self.offload
        placement = o.mode if o.mode != "block" else (
            f"block k={o.resident_blocks} d={o.prefetch} ram={o.ram_mode}")
        chunks = f", blocks in chunks of {self.chunk_tokens} tokens" if self.chunk_tokens else ""
        chunks += ", CFG per block" if self.cfg == "per_block" else ""
        vae = "whole frames" if self.vae.tile is None else f"tiles of {self.vae.tile}"
        line = (f"job: {self.weights.quant} weights in {self.dtype} on {self.device}, offload {placement}{chunks}, "
                f"text encoder on {self.text_encoder.device}, VAE {self.vae.dtype} {vae}, step cache "
                f"{'off' if self.step_cache is None else describe(self.step_cache)['policy']}")
        par = self.parallel
        if par is not None:
            sharded = [what for what, on in (("transformer", par.dit_fsdp), ("text encoder", par.t5_fsdp)) if on]
            ranks = f"{par.ranks} GPUs" if self.device.startswith("cuda") else f"{par.ranks} processes"
            line += f", tokens split over {ranks}" + (f" ({' and '.join(sharded)} sharded)" if sharded else "")
        x = self.prompt_extend
        if x is not None:
            line += f", prompt extended by {x.method} {x.model}" + (f" ({x.quant}) on {x.device}" if x.device else "")
        p = self.predicted
        if p is not None:
            line += (f"; predicted peak VRAM {p.peak_vram_gb:.1f} GB, RAM {p.peak_ram_gb:.1f} GB, "
                     f"{p.s_per_step:.1f} s/step, {p.total_s / 60:.0f} min for the clip")
        return line


def _plain(value):
    """Dataclasses, configs, paths and tuples as JSON values (a step cache as its policy and fields)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, CacheConfig):
        return _plain(describe(value))
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items()}
    raise TypeError(f"{type(value).__name__} has no plain form for the job")
