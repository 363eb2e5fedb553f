"""Choose how to run a generation on a machine: `make_plan(workload, hardware, quant)` -> `Plan`.

The planner enumerates weight formats (all, or the one `--quant` asks for) and, per format, the fastest
placement that fits: every expert resident (`none`), one expert at a time (`model`), or block streaming
(`block`) with as many resident blocks as the VRAM left after activations and ring buffers allows; host RAM
`pinned` when both experts fit in free RAM, `mmap` otherwise. The text encoder runs on the GPU when it fits
there alone, the VAE decodes whole frames when they fit and in the largest fitting tiles otherwise. A local
prompt extender (a Qwen chat model) is one more stage before them, placed the same way. Among the
plans that fit (VRAM with a 10 % margin, RAM), the fastest predicted wins; within 3 % the higher-precision
format wins. A `Plan` is plain data: printed, saved as TOML (a profile) and replayed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from wanlite.errors import WanliteError
from wanlite.planner.estimate import (EXTENDER_FORMATS, EXTENDER_WORKSPACE, GB, ULYSSES_EXCHANGE, Workload,
                                      cache_state_bytes, dit_activation_bytes, dit_bytes, dit_flops, exchange_bytes,
                                      extender_activation_bytes, extender_bytes, lora_block_bytes, t5_activation_bytes,
                                      t5_bytes, vae_bytes, vae_decode_bytes, vae_decode_flops)
from wanlite.planner.probe import Hardware
from wanlite.specs import TASKS, VAE_SPECS

# Weight formats from most to least precise (14B-block output error, bench/results/quant.json): bf16 0,
# Q8_0 0.41 %, Q6_K 0.98 %, fp8 1.07 %, int8 1.13 %, Q5_K 1.74 %, Q4_K 3.36 %.
PRECISION_ORDER = ("bf16", "Q8_0", "Q6_K", "fp8", "int8", "Q5_K", "Q4_K")
QUANT_FLAG = {"bf16": "none", "Q8_0": "gguf-q8_0", "Q6_K": "gguf-q6_k", "fp8": "fp8", "int8": "int8",
              "Q5_K": "gguf-q5_k", "Q4_K": "gguf-q4_k"}
FORMAT_OF_FLAG = {v: k for k, v in QUANT_FLAG.items()}
VRAM_MARGIN = 0.9  # of the free VRAM: the CUDA context, allocator rounding and fragmentation take the rest
RAM_RESERVE = 3 * GB  # the OS, Python, torch and the page cache's working set
MATMUL_EFFICIENCY = 0.55  # sustained fraction of the measured GEMM rate over a whole DiT forward
TILES_PX = (512, 384, 256, 192, 128)
CHUNKS = (None, 8192, 4096, 2048, 1024)  # tokens per block chunk (None: whole); smaller frees VRAM for blocks
CHUNK_COST = 1.03  # chunked blocks recompute the LayerNorm/modulation for keys and values, and launch more


def compute_factor(fmt: str, hw: Hardware) -> float:
    """Time of a forward in `fmt` relative to bf16: fp8 GEMMs on sm >= 8.9, dequantize-then-GEMM elsewhere."""
    if fmt == "bf16":
        return 1.0
    if fmt == "fp8" and hw.fp8_matmul:
        return 0.8
    return 1.1 if fmt in ("fp8", "int8") else 1.15  # GGUF: the dequant kernels run before each GEMM


@dataclass(frozen=True)
class Prediction:
    peak_vram_gb: float
    vram_weights_gb: float
    vram_activations_gb: float
    vram_buffers_gb: float
    vram_vae_gb: float
    vram_text_encoder_gb: float
    peak_ram_gb: float
    bytes_moved_per_step_gb: float
    s_per_step: float  # a step that runs every block (a step cache skips some: content-dependent)
    vram_cache_gb: float = 0.0  # step-cache state, part of vram_activations_gb
    # host RAM per stage (each component is loaded when its stage starts and released when it ends, so the
    # peak is their maximum, not their sum): the text encoder's, and the transformer's (denoising)
    ram_text_encoder_gb: float = 0.0
    ram_transformer_gb: float = 0.0
    # the whole clip: every step at s_per_step, reading the weights from disk once, the VAE decode (one denoising
    # run: S2V clips and Animate segments each add their steps and decode)
    total_s: float = 0.0
    # the local prompt extender (a stage of its own, first): its VRAM (0 on the CPU or without one) and RAM
    vram_prompt_extender_gb: float = 0.0
    ram_prompt_extender_gb: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Everything `generate` needs to decide, with what the planner predicted and why."""

    task: str
    width: int
    height: int
    frames: int
    steps: int
    device: str  # "cuda" | "cpu"
    quant: str  # a --quant value
    offload: str  # none | model | block
    resident_blocks: int
    prefetch: int
    ram_mode: str
    chunk_tokens: int  # 0: blocks run whole
    t5_device: str
    vae_tile: int  # latent pixels per tile; 0 = whole frames
    hardware: str
    predicted: Prediction
    reasons: tuple[str, ...] = field(default_factory=tuple)
    cache: str = "off"  # the step cache (--cache) the memory was planned with
    cfg: str = "batched"  # batched | per_block: CFG's two branches through each block together or one by one
    t5_quant: str = ""  # the text encoder's --quant when it differs from the transformer's ("": the same)
    extender_device: str = ""  # the local prompt extender: cuda | cpu ("": none)
    extender_quant: str = ""  # its decoder layers' --quant: none (bf16) | int8 | gguf-q4_k
    ranks: int = 1  # GPUs (--ulysses_size): the VRAM figures are each GPU's, the RAM the machine's (all ranks)

    @property
    def weight_format(self) -> str:
        return FORMAT_OF_FLAG.get(self.quant, self.quant)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        p = self.predicted
        placement = self.offload if self.offload != "block" else (
            f"block k={self.resident_blocks} d={self.prefetch} ram={self.ram_mode}")
        chunks = f", blocks in chunks of {self.chunk_tokens} tokens" if self.chunk_tokens else ""
        if self.extender_device:
            chunks += f", prompt extender ({self.extender_quant}) on {self.extender_device}"
        gpus = f" x{self.ranks} (tokens split)" if self.ranks > 1 else ""
        return (f"plan: {self.weight_format} on {self.device}{gpus}, offload {placement}{chunks}, text encoder on "
                f"{self.t5_device}, VAE {'whole frames' if not self.vae_tile else f'tiles of {self.vae_tile}'}; "
                f"predicted peak VRAM {p.peak_vram_gb:.1f} GB, RAM {p.peak_ram_gb:.1f} GB, "
                f"{p.s_per_step:.1f} s/step")


@dataclass(frozen=True)
class _Option:
    fmt: str
    chunk: int | None
    offload: str
    resident: int
    ram_mode: str
    vram: float
    ram: float
    s_per_step: float
    moved: float
    weights: float
    activations: float
    buffers: float
    rows_apart: bool = False  # per-block CFG


def _dit_options(work: Workload, hw: Hardware, fmt: str, budget: float, prefetch: int,
                 chunk: int | None, rows_apart: bool = False) -> list[_Option]:
    task = TASKS[work.task]
    spec = work.spec
    experts = len(task.experts)
    nonblock, block = dit_bytes(work.spec, fmt)
    block += lora_block_bytes(spec, work.lora_rank or (work.fp8_lora_rank if fmt == "fp8" else 0))
    expert = nonblock + spec.num_layers * block
    # several GPUs: each runs its share of the tokens (attention: all tokens, its share of the heads), and
    # every block swaps q / k / v / output with the others over the bus; every rank holds its own host copies
    tokens, ranks = work.rank_tokens, work.ranks
    act = dit_activation_bytes(work.spec, tokens, chunk, quantized=fmt != "bf16", batch=work.passes,
                               rows_apart=rows_apart, keeps_inputs=work.cache is not None)
    act += cache_state_bytes(work.spec, tokens, work.cache, work.passes)
    compute = (dit_flops(work.spec, work.tokens, work.passes) / ranks / (hw.bf16_flops * MATMUL_EFFICIENCY)
               * compute_factor(fmt, hw))
    compute *= 1.0 if chunk is None else CHUNK_COST
    if ranks > 1:
        act += int(ULYSSES_EXCHANGE * (1 if rows_apart else work.passes) * tokens * spec.dim)
        compute += spec.num_layers * exchange_bytes(spec, tokens, work.passes) / (hw.h2d_pinned or 10 * GB)
    host = lambda per_rank: RAM_RESERVE + ranks * per_rank  # noqa: E731
    host_all = host(experts * expert)
    options = []
    # --dit_fsdp: each GPU holds 1/N of every weight, plus the block being gathered and the next one
    held = expert / ranks + 2 * block if work.fsdp else expert
    if experts * held + act <= budget:
        options.append(_Option(fmt, chunk, "none", spec.num_layers, "pinned", experts * held + act,
                               host(expert if work.fsdp else 0), compute, 0.0, experts * held, act, 0.0, rows_apart))
    if held + act <= budget:
        # one expert resident: the other is loaded from disk at the switch (once per run, not per step)
        options.append(_Option(fmt, chunk, "model", spec.num_layers, "pinned", held + act, host(expert),
                               compute, 0.0, held, act, 0.0, rows_apart))
    if work.fsdp:  # sharded blocks are not streamed
        return options
    buffers = nonblock + (prefetch + 1) * block
    resident = math.floor((budget - act - buffers) / block) if block else 0
    if resident >= 0:
        resident = min(resident, spec.num_layers)
        streamed = (spec.num_layers - resident) * block
        pinned_fits = host_all <= hw.ram_available
        ram_mode = "pinned" if pinned_fits else "mmap"
        rate = hw.h2d_pinned if pinned_fits else min(hw.h2d_pageable or hw.h2d_pinned, hw.disk_read or 1 * GB)
        transfer = streamed / rate if rate else float("inf")
        ram = host_all if pinned_fits else host(nonblock + (prefetch + 3) * block)
        options.append(_Option(fmt, chunk, "block", resident, ram_mode, act + buffers + resident * block, ram,
                               max(compute, transfer), streamed, nonblock + resident * block, act, buffers,
                               rows_apart))
    return options


def _vae_tile(work: Workload, budget: float) -> tuple[int, float, str]:
    """(latent tile, device bytes, reason): whole frames when they fit, else the largest fitting tile."""
    weights = vae_bytes(VAE_SPECS[TASKS[work.task].vae].version)
    stride = VAE_SPECS[TASKS[work.task].vae].stride[1]
    whole = weights + vae_decode_bytes(work.task, work.height, work.width, work.frames, None)
    if whole <= budget:
        return 0, whole, ""
    for px in TILES_PX:
        need = weights + vae_decode_bytes(work.task, work.height, work.width, work.frames, px)
        if need <= budget:
            return px // stride, need, (f"VAE in {px}-pixel tiles: whole frames need {whole / GB:.1f} GB, "
                                        f"{budget / GB:.1f} GB are usable")
    px = TILES_PX[-1]
    return px // stride, weights + vae_decode_bytes(work.task, work.height, work.width, work.frames, px), \
        "VAE in the smallest tiles, which still exceed the budget"


def make_plan(work: Workload, hw: Hardware, quant: str = "auto", prefetch: int = 2) -> Plan:
    """The fastest plan that fits `hw` (see the module docstring). `quant`: "auto" lets the planner pick the
    format, any `--quant` value (none, fp8, int8, gguf-q8_0, ...) fixes it. Raises `WanliteError` naming the
    nearest plan that fits when nothing does."""
    if quant not in ("auto", *FORMAT_OF_FLAG):
        raise WanliteError(f"the planner chooses among --quant auto, {', '.join(FORMAT_OF_FLAG)}; got {quant!r}")
    formats = PRECISION_ORDER if quant == "auto" else (FORMAT_OF_FLAG[quant],)
    if work.fsdp:  # FSDP shards 16-bit parameters, not quantized buffers
        if "bf16" not in formats:
            raise WanliteError(f"--dit_fsdp shards 16-bit weights; --quant {quant} is not sharded: drop one of them")
        formats = ("bf16",)
    if hw.gpu is None:
        return _cpu_plan(work, hw, formats)
    budget = hw.vram_free * VRAM_MARGIN
    reasons = []
    # S2V clips and Animate segments encode and decode between denoising runs, next to the transformer
    multipart = TASKS[work.task].conditioning in ("speech", "animate")
    if not multipart:
        tile, vae_need, vae_reason = _vae_tile(work, budget)
        if vae_reason:
            reasons.append(vae_reason)
    options = _candidates(work, hw, formats, budget, prefetch)
    if not options and work.passes > 1:  # per-block CFG: one branch's activations at a time, same weights traffic
        options = _candidates(work, hw, formats, budget, prefetch, rows_apart=True)
        if options:
            reasons.append("CFG per block: cond and uncond go through each block one after the other (the "
                           "batched pair's activations do not fit)")
    if not options:
        raise WanliteError(_nothing_fits(work, hw, quant, budget, prefetch))
    best_time = min(o.s_per_step for o in options)
    fast = [o for o in options if o.s_per_step <= best_time * 1.03]
    rank = {f: i for i, f in enumerate(PRECISION_ORDER)}
    placement_rank = {"none": 0, "model": 1, "block": 2}
    best = min(fast, key=lambda o: (rank[o.fmt], o.s_per_step, placement_rank[o.offload], -o.resident,
                                    -(o.chunk or 1 << 30)))
    reasons += _explain(work, hw, best, budget, formats)
    if multipart:
        tile, vae_need, vae_reason = _vae_tile(work, budget - best.weights - best.buffers)
        if vae_reason:
            reasons.append(vae_reason + " next to the transformer (kept between clips / segments)")
        vae_need += best.weights + best.buffers
    # the text encoder runs alone before the DiT loads, in the DiT's format (bf16 / fp8 / int8; GGUF: bf16)
    t5_fmt = best.fmt if best.fmt in ("fp8", "int8") else "bf16"
    if t5_fmt == "bf16" and work.ranks * t5_bytes("bf16") + RAM_RESERVE > hw.ram_available:
        t5_fmt = "fp8"  # stored fp8 and upcast per layer: any GPU runs it, and it loads in half the RAM
        reasons.append(f"text encoder in fp8: in bf16 it needs {(t5_bytes('bf16') + RAM_RESERVE) / GB:.1f} GB of "
                       f"RAM, {hw.ram_available / GB:.1f} GB are free")
    t5_vram = t5_bytes(t5_fmt) + t5_activation_bytes()
    t5_device = "cuda" if t5_vram <= budget else "cpu"
    if t5_device == "cpu":
        reasons.append(f"text encoder on the CPU: in {t5_fmt} it needs {t5_vram / GB:.1f} GB, {budget / GB:.1f} GB "
                       "of VRAM are usable")
        t5_vram = 0
    t5_ram = work.ranks * t5_bytes(t5_fmt) + RAM_RESERVE  # every rank encodes the prompt
    ext_device, ext_quant, ext_vram, ext_ram, ext_reasons = _extender_placement(work, hw, budget)
    reasons += ext_reasons
    predicted = Prediction(
        peak_vram_gb=round(max(best.vram, vae_need, t5_vram, ext_vram) / GB, 2),
        vram_weights_gb=round(best.weights / GB, 2),
        vram_activations_gb=round(best.activations / GB, 2), vram_buffers_gb=round(best.buffers / GB, 2),
        vram_vae_gb=round(vae_need / GB, 2), vram_text_encoder_gb=round(t5_vram / GB, 2),
        peak_ram_gb=round(max(best.ram, t5_ram, ext_ram) / GB, 2),
        bytes_moved_per_step_gb=round(best.moved / GB, 2),
        s_per_step=round(best.s_per_step, 2),
        vram_cache_gb=round(cache_state_bytes(work.spec, work.rank_tokens, work.cache, work.passes) / GB, 2),
        ram_text_encoder_gb=round(t5_ram / GB, 2), ram_transformer_gb=round(best.ram / GB, 2),
        total_s=clip_seconds(work, hw, best.s_per_step, best.fmt, t5_fmt),
        vram_prompt_extender_gb=round(ext_vram / GB, 2), ram_prompt_extender_gb=round(ext_ram / GB, 2))
    return Plan(work.task, work.width, work.height, work.frames, work.steps, "cuda", QUANT_FLAG[best.fmt],
                best.offload, best.resident if best.offload == "block" else 0,
                prefetch if best.offload == "block" else 0, best.ram_mode, best.chunk or 0, t5_device, tile,
                hw.describe(),
                predicted, tuple(reasons), cache_name(work.cache), "per_block" if best.rows_apart else "batched",
                "fp8" if t5_fmt == "fp8" and best.fmt != "fp8" else "", ext_device, ext_quant, work.ranks)


def _extender_placement(work: Workload, hw: Hardware, budget: float) -> tuple[str, str, float, float, list[str]]:
    """(device, --quant, VRAM bytes, RAM bytes, reasons) of the local prompt extender, a stage of its own that
    runs first and is released before the text encoder loads: on the GPU in the most precise format that fits
    there alone (bf16, int8, Q4_K for its decoder layers), else on the CPU in bf16. Quantized decoder layers are
    quantized one weight at a time as they are read (prompt_extend.quantized_on_arrival), so the RAM the load
    needs is the quantized model's plus the quantizer's scratch, not the bf16 model's."""
    spec = work.extender
    if spec is None:
        return "", "", 0.0, 0.0, []
    dense = extender_bytes(spec, "none")
    act = extender_activation_bytes(spec)
    loading = lambda quant: (dense if quant == "none" else extender_bytes(spec, quant) + EXTENDER_WORKSPACE)  # noqa: E731
    if loading("gguf-q4_k") + RAM_RESERVE > hw.ram_available:
        raise WanliteError(f"the prompt extender {spec.name} needs {(loading('gguf-q4_k') + RAM_RESERVE) / GB:.1f} GB "
                           f"of RAM to load even with Q4_K decoder layers, {hw.ram_available / GB:.1f} GB are free; "
                           "use a smaller --prompt_extend_model (Qwen2.5_7B, Qwen2.5_3B, QwenVL2.5_3B) or "
                           "--prompt_extend_method dashscope")
    if hw.gpu is not None:
        for quant in EXTENDER_FORMATS:
            vram = extender_bytes(spec, quant) + act
            if vram <= budget and loading(quant) + RAM_RESERVE <= hw.ram_available:
                why = [] if quant == "none" else [
                    f"prompt extender {spec.name} in {quant}: in bf16 it needs {(dense + act) / GB:.1f} GB, "
                    f"{budget / GB:.1f} GB of VRAM are usable"]
                return "cuda", quant, vram, loading(quant) + RAM_RESERVE, why
    ram = dense + act + RAM_RESERVE
    if ram > hw.ram_available:
        raise WanliteError(f"the prompt extender {spec.name} fits neither the GPU nor {hw.ram_available / GB:.1f} GB "
                           f"of free RAM ({ram / GB:.1f} GB on the CPU); use a smaller --prompt_extend_model "
                           "(Qwen2.5_7B, Qwen2.5_3B, QwenVL2.5_3B) or --prompt_extend_method dashscope")
    why = [] if hw.gpu is None else [f"prompt extender {spec.name} on the CPU: even with Q4_K decoder layers it "
                                     f"needs {(extender_bytes(spec, 'gguf-q4_k') + act) / GB:.1f} GB, "
                                     f"{budget / GB:.1f} GB of VRAM are usable"]
    return "cpu", "none", 0.0, ram, why


def _explain(work: Workload, hw: Hardware, best: _Option, budget: float, formats) -> list[str]:
    reasons = []
    experts = len(TASKS[work.task].experts)
    if best.fmt != "bf16" and "bf16" in formats:
        nonblock, block = dit_bytes(work.spec, "bf16")
        expert = nonblock + work.spec.num_layers * block
        reasons.append(f"{best.fmt} instead of bf16: bf16 experts need {experts * expert / GB:.1f} GB "
                       f"({expert / GB:.1f} GB each); {budget / GB:.1f} GB of VRAM and "
                       f"{hw.ram_available / GB:.1f} GB of RAM are usable")
    if best.offload == "block":
        reasons.append(f"block offload: {best.resident} of {work.spec.num_layers} blocks fit "
                       f"next to {best.activations / GB:.1f} GB of activations; {best.moved / GB:.1f} GB cross the "
                       "bus per step")
    if best.ram_mode == "mmap":
        reasons.append(f"--ram_mode mmap: the experts do not fit in {hw.ram_available / GB:.1f} GB of free RAM")
    return reasons


def _candidates(work: Workload, hw: Hardware, formats, budget: float, prefetch: int, rows_apart: bool = False) -> list:
    """Every placement that fits VRAM and RAM (the text encoder's RAM phase comes first and is released, so
    it never adds to the DiT's; it needs at most its bf16 weights, which any candidate machine holds)."""
    chunks = [c for c in CHUNKS if c is None or c < work.rank_tokens]
    t5_ram = work.ranks * t5_bytes("fp8") + RAM_RESERVE
    return [opt for fmt in formats for chunk in chunks
            for opt in _dit_options(work, hw, fmt, budget, prefetch, chunk, rows_apart)
            if max(opt.ram, t5_ram) <= hw.ram_available]


def _nothing_fits(work: Workload, hw: Hardware, quant: str, budget: float, prefetch: int) -> str:
    act = dit_activation_bytes(work.spec, work.rank_tokens, CHUNKS[-1], quantized=True, batch=work.passes,
                               rows_apart=work.passes > 1, keeps_inputs=work.cache is not None)
    fitting = [f for f in PRECISION_ORDER if _candidates(work, hw, (f,), budget, prefetch, rows_apart=True)]
    if fitting:
        hint = f"the nearest plan that fits uses --quant {QUANT_FLAG[fitting[0]]}"
    else:
        hint = "no weight format fits; use a smaller --size or fewer --frame_num"
    return (f"{work.task} at {work.width}*{work.height}, {work.frames} frames does not fit "
            f"{hw.vram_free / GB:.1f} GB of free VRAM and {hw.ram_available / GB:.1f} GB of RAM with --quant "
            f"{quant} (activations alone: {act / GB:.1f} GB of {budget / GB:.1f} GB usable); {hint}")


def _cpu_plan(work: Workload, hw: Hardware, formats) -> Plan:
    """No GPU: weights stay as stored (bf16 unless --quant says otherwise), one expert in RAM at a time."""
    fmt = formats[0]
    nonblock, block = dit_bytes(work.spec, fmt)
    expert = nonblock + work.spec.num_layers * block
    ranks = work.ranks  # processes on this machine's cores and RAM, each with its own copy and its share of tokens
    act = dit_activation_bytes(work.spec, work.rank_tokens, None, quantized=fmt != "bf16", batch=work.passes)
    seconds = dit_flops(work.spec, work.tokens, work.passes) / (max(hw.bf16_flops, 1e9) * MATMUL_EFFICIENCY)
    ram = ranks * (expert + act) + RAM_RESERVE
    offload, ram_mode, reasons = "model", "pinned", ["no CUDA GPU: everything runs on the CPU"]
    if ram > hw.ram_available:
        offload, ram_mode = "block", "mmap"
        ram = ranks * (nonblock + 4 * block + act) + RAM_RESERVE
        reasons.append(f"--ram_mode mmap: one expert needs {expert / GB:.1f} GB, {hw.ram_available / GB:.1f} GB "
                       "of RAM are free")
    # the text encoder runs first, on the CPU, in the transformer's format (bf16 / fp8 / int8; GGUF: bf16), and is
    # released before the transformer loads
    t5_fmt = fmt if fmt in ("fp8", "int8") else "bf16"
    t5_ram = ranks * (t5_bytes(t5_fmt) + t5_activation_bytes()) + RAM_RESERVE
    ext_device, ext_quant, _, ext_ram, ext_reasons = _extender_placement(work, hw, 0.0)
    predicted = Prediction(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, round(max(ram, t5_ram, ext_ram) / GB, 2), 0.0,
                           round(seconds, 1), ram_text_encoder_gb=round(t5_ram / GB, 2),
                           ram_transformer_gb=round(ram / GB, 2),
                           total_s=clip_seconds(work, hw, seconds, fmt, t5_fmt),
                           ram_prompt_extender_gb=round(ext_ram / GB, 2))
    return Plan(work.task, work.width, work.height, work.frames, work.steps, "cpu",
                "auto" if len(formats) > 1 else QUANT_FLAG[fmt], offload, 0, 1 if offload == "block" else 0,
                ram_mode, 0, "cpu", 0, hw.describe(), predicted, tuple(reasons + ext_reasons), cache_name(work.cache),
                extender_device=ext_device, extender_quant=ext_quant, ranks=ranks)


def clip_seconds(work: Workload, hw: Hardware, s_per_step: float, fmt: str, t5_fmt: str) -> float:
    """Steps x s/step, plus reading every expert and the text encoder from disk once (1 GB/s when the drive was
    not measured), plus the VAE decode (its fp32 convolutions at half the matmul rate)."""
    nonblock, block = dit_bytes(work.spec, fmt)
    weights = len(TASKS[work.task].experts) * (nonblock + work.spec.num_layers * block) + t5_bytes(t5_fmt)
    weights += 0 if work.extender is None else extender_bytes(work.extender, "none")
    load = weights / (hw.disk_read or GB)
    decode = 2 * vae_decode_flops(work.task, work.height, work.width, work.frames) / (
        max(hw.bf16_flops, 1e9) * MATMUL_EFFICIENCY)
    return round(work.steps * s_per_step + load + decode, 1)


def cache_name(config) -> str:
    from wanlite.cache import PRESETS

    if config is None:
        return "off"
    return next((name for name, preset in PRESETS.items() if preset == config), type(config).__name__)


# ---------------------------------------------------------------------------------------------- profiles
PROFILE_CHOICES = ("quant", "offload", "resident_blocks", "prefetch", "ram_mode", "chunk_tokens", "t5_device",
                   "vae_tile", "cache", "cfg")  # what a profile's [plan] can decide, in the order it is written
PROFILE_TYPES = {"gpu": str, "vram_gb": (int, float), "ram_gb": (int, float), "disk_gbps": (int, float), "quant": str,
                 "offload": str, "resident_blocks": int, "prefetch": int, "ram_mode": str, "t5_device": str,
                 "chunk_tokens": int,
                 "vae_tile": int, "cache": str, "cfg": str, "description": str}


def plan_to_toml(plan: Plan) -> str:
    """A profile replaying `plan` on the same kind of machine (the predictions are kept as comments)."""
    comments = [f"wanlite profile saved from a plan for {plan.task} {plan.width}*{plan.height}, {plan.frames} "
                f"frames on {plan.hardware}", plan.summary(), *(f"why: {r}" for r in plan.reasons)]
    return profile_toml({k: getattr(plan, k) for k in PROFILE_CHOICES}, comments)


def profile_toml(choices: dict, comments: list[str]) -> str:
    """A profile's text: `comments` then a [plan] section with `choices` (keys of PROFILE_CHOICES)."""
    lines = [f"# {c}" for c in comments] + ["[plan]"]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in choices.items()]
    return "\n".join(lines) + "\n"


def read_profile(text: str, where: str) -> dict:
    """Parse and validate a profile: `[hardware]` (gpu, vram_gb, ram_gb, disk_gbps) and/or `[plan]` choices;
    an unknown key or a wrong type is named with its file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WanliteError(f"{where}: not valid TOML ({exc})") from None
    out = {}
    for section, values in data.items():
        if section not in ("hardware", "plan") or not isinstance(values, dict):
            raise WanliteError(f"{where}: unknown section [{section}]; a profile has [hardware] and [plan]")
        for key, value in values.items():
            if key not in PROFILE_TYPES:
                raise WanliteError(f"{where}: unknown key {key!r} in [{section}]; known: "
                                   f"{', '.join(sorted(PROFILE_TYPES))}")
            want = PROFILE_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, want):
                kind = "number" if isinstance(want, tuple) else {"str": "string", "int": "whole number"}[want.__name__]
                raise WanliteError(f"{where}: {key} = {value!r} must be a {kind}")
            out[key] = value
    return out


def apply_profile(plan: Plan, choices: dict) -> Plan:
    """A plan with a profile's [plan] choices put in place of the planner's."""
    given = {k: choices[k] for k in PROFILE_CHOICES if k in choices}
    if not given:
        return plan
    note = "choices from the profile: " + ", ".join(f"{k}={v}" for k, v in given.items())
    return replace(plan, **given, reasons=plan.reasons + (note,))
