"""resolve(request, machine) -> Job: every decision about a generation, in one place.

Validation, checkpoint discovery, the output size, the LoRA policy, the planner's choices merged with the
flags, and every fallback (pinned -> mmap -> disk host memory, LoRA merge -> runtime for fp8, step caching off
for distilled schedules) happen here, before any weight is loaded. `execute` then runs the Job as it is.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from pathlib import Path

import torch

from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import CheckpointSet, Component, discover, locate, with_components
from wanlite.loading.models import check_checkpoint, expert_components
from wanlite.lora import lora_sets
from wanlite.models.attention import BACKENDS, PACKAGES, available_backends
from wanlite.models.clip import find_clip
from wanlite.models.vae import Tiling
from wanlite.offload import OffloadConfig, converts_on_load, default_cache_dir, host_bytes
from wanlite.pipelines.conditioning import load_image
from wanlite.pipelines.job import DTYPES, Job, KeepPlan, LoraPlan, ParallelPlan, TextEncoderPlan, VaePlan, Weights
from wanlite.pipelines.prompt_extend import placed, plan_extender
from wanlite.pipelines.request import RELIGHTING_LORA, Request, Settings, cache_settings, validate
from wanlite.pipelines.segments import KINDS
from wanlite.planner import Hardware, Placement, Workload, hardware_for, load_profile, plan_for_request
from wanlite.planner.probe import GB
from wanlite.quant import DenseConfig, parse_quant
from wanlite.quant.fp8 import Fp8WeightConfig
from wanlite.specs import DIT_SPECS, TASKS, VAE_SPECS

DEFAULT_TILE_PX = 256  # VAE tile side in pixels when nothing else is asked (diffusers' and ComfyUI's default too)


def resolve(request: Request, machine: Hardware | None = None, without_files: bool = False,
            reuse: bool = False) -> Job:
    """The Job for `request` on `machine` (None: this machine, measured now; a `Hardware` describes another
    one, as `wanlite plan --vram N` does, or this one as a `Pipeline` measured it when it started). Raises
    WanliteError (exit code 2) for anything wrong with the request, its files or the fit, before anything is
    loaded. `without_files`: no checkpoint yet (`wanlite plan` before a download): the task's full-size
    transformer, stored dense, no LoRAs; such a job is for reading only. `reuse`: the job of a `Pipeline`,
    which keeps components between generations where the memory allows (`Job.keep`)."""
    req = request
    if req.ckpt_dir is not None:  # a repo id in the HF cache, a ComfyUI models folder: the files they hold
        root, picked = locate(req.ckpt_dir, req.task if req.task in TASKS else None, set(req.component_files()))
        req = replace(req, ckpt_dir=root, **picked)
    settings = validate(req, req.seed if req.seed >= 0 else secrets.randbelow(2**31), files=not without_files)
    task = TASKS[settings.task]
    if settings.image is not None:  # an unreadable image is named before any checkpoint file is read
        load_image(Path(settings.image))
    choices = {} if req.profile == "auto" else load_profile(req.profile)[0]
    hw = machine if machine is not None else machine_for(req)
    device = pick_device(req.device) if hw.measured else torch.device("cuda" if hw.gpu else "cpu")
    dtype = compute_dtype(req.dtype, device, hw)
    parse_quant(req.quant, req.quant_backend)  # a bad --quant fails before anything is read
    if without_files:
        if req.lora or req.lora_high or req.lora_low:
            raise WanliteError("planning LoRAs needs the checkpoint they apply to: pass --ckpt_dir")
        experts, spec, sources = {}, DIT_SPECS[task.dit], []
    else:
        ckpt = checkpoint_set(req.ckpt_dir, req.component_files())
        found = check_checkpoint(ckpt, task.name)  # every component present and the right shape before any work
        experts = expert_components(ckpt, task.name)
        spec = next(prepared for label, _, prepared in found if label.startswith("transformer")).model.spec
        sources = [prepared.source for label, _, prepared in found if label.startswith("transformer")]
        if spec.animate is not None:  # its CLIP image encoder lives beside the transformer
            find_clip(Path(req.ckpt_dir))
    settings = replace(settings, size=KINDS[task.conditioning].output_size(task, settings, spec))
    wav2vec = speech_encoder_folder(req) if spec.s2v is not None and not without_files else None
    parallel = parallel_plan(req, spec, settings)

    warnings: list[str] = []
    lora_mode = req.lora_mode
    if any(gain != 1.0 for _, _, gain in settings.phases):
        if lora_mode == "merge":
            raise WanliteError(f"--preset {req.preset} switches the LoRAs off for some steps, which merged weights "
                               "cannot do; drop --lora_mode merge")
        lora_mode = "runtime"  # a phase turns the LoRA off: it must stay a branch
    on_all = list(req.lora)
    if settings.relighting_lora:  # PEFT rank 128, alpha 128: strength 1
        on_all.append(str(Path(req.ckpt_dir) / RELIGHTING_LORA))
    # read and checked against the model before any weight is loaded
    sets = lora_sets(on_all, list(req.lora_high), list(req.lora_low), experts, task.name, lora_mode,
                     lambda event: warnings.append(event["message"]))
    prequantized = stored_quantized(sources)
    total_rank = max((sum(f.rank for f, _ in s.loras) for s in sets.values()), default=0)
    branched = lora_mode == "runtime" or (lora_mode == "auto" and prequantized)
    cache = cache_settings(req, choices.get("cache", "off") if req.cache == "auto" else req.cache)
    passes = 2 if any(abs(g - 1.0) > 1e-6 for g in settings.guide_scale) else 1
    extender = plan_extender(req, settings.image is not None, without_files)  # (plan, local model size) or None
    placement = plan_for_request(
        req, choices, hw, Workload(task.name, *settings.size, settings.frames, settings.steps, spec, cache, passes,
                                   total_rank if branched else 0, total_rank if lora_mode == "auto" else 0,
                                   extender=None if extender is None else extender[1], ranks=req.ulysses_size,
                                   fsdp=req.dit_fsdp),
        prequantized)
    quant = parse_quant(placement.quant, req.quant_backend)
    if lora_mode == "auto" and isinstance(quant, Fp8WeightConfig):
        # e4m3 keeps 3 mantissa bits: merged into the weight, a LoRA's small update is mostly rounded away
        # (bench/results/lora.json: a third of the tiny LoRA's effect lost); as a branch it stays exact
        lora_mode = "runtime"
    offload = offload_config(placement, req, device, hw, experts, task.name, quant, warnings)
    if parallel is not None:
        check_sharding(parallel, offload, quant, prequantized, placement.t5_cpu)
    loras = tuple(lora_plan(role, s, lora_mode, offload) for role, s in sets.items())
    stride = VAE_SPECS[task.vae].stride[1]
    w, h = settings.size
    tiling = vae_tiling(placement.vae_tile, stride, (h // stride, w // stride))
    plan = placement.plan
    predicted = None if plan is None else plan.predicted
    reasons = [] if plan is None else list(plan.reasons)
    if predicted is not None and predicted.total_s > 3600:
        from wanlite.pipelines.progress import clock

        cheaper = ["a smaller --size or fewer --frame_num", "--cache fast"]
        if settings.steps > 8:
            cheaper.insert(1, "--preset lightning with the Lightning LoRAs (4 steps)")
        warnings.append(f"this clip is predicted to take about {clock(predicted.total_s)} here; cheaper: "
                        + ", ".join(cheaper))
    keep = KeepPlan()
    if reuse and not without_files and parallel is None:  # sharded weights are not kept between generations
        keep = keep_plan(device, hw, offload, host_bytes(experts, task.name, quant), ckpt, predicted,
                         placement.t5_cpu)
        reasons.append(f"between generations the transformer waits {WHERE[keep.transformer]}, the text encoder "
                       f"{WHERE[keep.text_encoder]}, the VAE {WHERE[keep.vae]}")
    return Job(
        settings=settings, device=str(device), dtype=dtype,
        weights=Weights(None if req.ckpt_dir is None else str(req.ckpt_dir),
                        tuple((flag, str(path)) for flag, path in req.component_files().items()),
                        placement.quant, req.quant_backend, prequantized),
        offload=offload, chunk_tokens=placement.chunk_tokens,
        step_cache=step_cache_config(req, cache, settings, experts, spec.num_layers, warnings, parallel),
        loras=loras,
        text_encoder=TextEncoderPlan("cpu" if placement.t5_cpu else str(device),
                                     # sharded (--t5_fsdp): as stored, FSDP shards 16-bit parameters only
                                     "auto" if req.t5_fsdp else placement.t5_quant or placement.quant),
        vae=VaePlan(req.vae_dtype, None if tiling is None else tiling.tile, None if tiling is None else tiling.overlap),
        attention=attention_backend(req.attention, device), wav2vec=None if wav2vec is None else str(wav2vec), machine=hw.describe(),
        predicted=predicted, reasons=tuple(reasons), warnings=tuple(warnings), keep=keep,
        cfg=placement.cfg if passes > 1 else "batched", compile=req.compile and compiler_ready(device),
        prompt_extend=None if extender is None else placed(extender[0], placement, device), parallel=parallel)


WHERE = {"device": "on the device", "host": "in RAM", "none": "nowhere (loaded again)"}


def parallel_plan(req: Request, spec, settings: Settings) -> ParallelPlan | None:
    """Several GPUs (torchrun, --ulysses_size N): the heads and the tokens must split evenly over the ranks."""
    ranks = req.ulysses_size
    if ranks == 1:
        return None
    if spec.num_heads % ranks:
        raise WanliteError(f"--ulysses_size {ranks}: the transformer's {spec.num_heads} attention heads do not split "
                           f"over {ranks} GPUs; use a number of GPUs that divides {spec.num_heads}")
    w, h = settings.size
    tokens = Workload(settings.task, w, h, settings.frames, settings.steps, spec).tokens
    if tokens % ranks:
        raise WanliteError(f"--size {w}*{h} with {settings.frames} frames gives {tokens} latent tokens, which do not "
                           f"split over {ranks} GPUs; pick a size or frame count whose tokens are a multiple of {ranks}")
    if req.compile:
        raise WanliteError("--compile does not combine with --ulysses_size yet (the blocks exchange tokens with the "
                           "other GPUs); drop --compile")
    return ParallelPlan(ranks, req.dit_fsdp, req.t5_fsdp)


def check_sharding(parallel: ParallelPlan, offload: OffloadConfig, quant, prequantized: bool, t5_cpu: bool) -> None:
    """FSDP shards 16/32-bit parameters of whole blocks on the GPUs: not streamed blocks, not quantized buffers."""
    if parallel.dit_fsdp and offload.mode == "block":
        raise WanliteError("--dit_fsdp shards whole blocks over the GPUs and --offload block streams them from RAM; "
                           "use one of them (--offload none with --dit_fsdp)")
    if parallel.dit_fsdp and (not (quant is None or isinstance(quant, DenseConfig)) or prequantized):
        raise WanliteError("--dit_fsdp shards 16-bit weights; quantized ones (--quant, or files stored quantized) "
                           "are not sharded: drop --dit_fsdp (each GPU then holds the quantized model) or use the "
                           "bf16 files with --quant none")
    if parallel.t5_fsdp and t5_cpu:
        raise WanliteError("--t5_fsdp shards the text encoder over the GPUs and --t5_cpu runs it on the CPU; drop one")


def keep_plan(device: torch.device, hw: Hardware, offload: OffloadConfig, weights: int, ckpt: CheckpointSet,
              predicted, t5_cpu: bool) -> KeepPlan:
    """What a Pipeline keeps loaded between generations, within the RAM (and VRAM) the machine had free when
    it started. Block offload keeps its engine (its host copies are the plan's own memory; the device buffers
    go back after each run). Whole experts stay where they ran when the VAE decode and the next text encoding
    fit beside them, else wait in RAM, or are loaded again when RAM is short; the text encoder waits in RAM
    beside what stays. Every wait on the CPU is on the device."""
    host = "device" if device.type == "cpu" else "host"
    room = 0.9 * hw.ram_available
    text_encoder = sum(f.stat().st_size for f in ckpt.t5.files)
    if offload.mode == "block":
        transformer, in_ram = "host", weights if offload.ram_mode == "pinned" else 0
    elif weights + text_encoder > room:
        transformer, in_ram = "none", 0
    else:
        transformer, in_ram = host, weights
        if host == "host" and offload.mode == "none" and (predicted is None or fits_beside_weights(
                predicted, hw, t5_cpu)):
            transformer, in_ram = "device", 0
    return KeepPlan(text_encoder=host if in_ram + text_encoder <= room else "none", transformer=transformer,
                    vae=host)


def fits_beside_weights(predicted, hw: Hardware, t5_cpu: bool) -> bool:
    """The VAE decode and (on the GPU) the text encoding fit in the VRAM the resident transformer leaves."""
    beside = max(predicted.vram_vae_gb, 0.0 if t5_cpu else predicted.vram_text_encoder_gb)
    return (predicted.vram_weights_gb + predicted.vram_buffers_gb + beside) * GB <= 0.92 * hw.vram_free


def machine_for(req: Request) -> Hardware:
    """This machine as the request's profile sees it, with the memory free now."""
    choices = {} if req.profile == "auto" else load_profile(req.profile)[0]
    return hardware_for(choices, pick_device(req.device))


def compute_dtype(name: str, device: torch.device, hw: Hardware) -> str:
    """`auto`: bf16, except on a GPU without bf16 units (compute capability below 8.0: T4, RTX 20xx, GTX 10xx,
    P100), which computes in fp16 (its norms, modulation and residual stream stay fp32 as in bf16)."""
    if name == "auto":
        old_gpu = device.type == "cuda" and hw.compute_capability is not None and hw.compute_capability < (8, 0)
        return "fp16" if old_gpu else "bf16"
    if name not in DTYPES:
        raise WanliteError(f"--dtype {name!r} is unknown; choose auto or one of {', '.join(DTYPES)}")
    return name


def compiler_ready(device: torch.device) -> bool:
    """--compile needs what torch.compile's Inductor builds with: Triton on a GPU, a C++ compiler on the CPU."""
    import importlib.util
    import shutil

    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise WanliteError("--compile on a GPU needs Triton (pip install triton; on Windows: triton-windows); "
                           "drop --compile to run uncompiled")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "clang++", "cl")):
        raise WanliteError("--compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on PATH; drop "
                           "--compile to run uncompiled")
    return True


def attention_backend(name: str, device: torch.device) -> str:
    """The attention kernel: `auto` is PyTorch's SDPA (it picks its flash / memory-efficient kernels itself);
    flash-attn and SageAttention when asked for, installed, and the job runs on a CUDA GPU."""
    if name == "auto":
        return "sdpa"
    if name not in BACKENDS:
        raise WanliteError(f"--attention {name!r} is unknown; choose auto, {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise WanliteError(f"--attention {name} needs the {PACKAGES[name]} package, which is not installed here "
                           f"(pip install {PACKAGES[name]}); --attention sdpa works everywhere")
    if BACKENDS[name][2] and device.type != "cuda":
        raise WanliteError(f"--attention {name} runs on a CUDA GPU only; this job runs on {device.type}: use "
                           "--attention sdpa")
    return name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WanliteError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WanliteError("--device cuda was asked for but this torch has no CUDA GPU; install a CUDA build of "
                           "torch (README) or use --device cpu")
    return device


def checkpoint_set(ckpt_dir, files: dict[str, Path]) -> CheckpointSet:
    """A checkpoint folder (or none) with the component files given on their own put in."""
    return with_components(None if ckpt_dir is None else discover(ckpt_dir), files)


def speech_encoder_folder(req: Request) -> Path:
    from wanlite.pipelines.speech import find_wav2vec

    if req.wav2vec is None and req.ckpt_dir is None:
        raise WanliteError("s2v-14B reads speech with wav2vec2: pass --ckpt_dir (holding "
                           "wav2vec2-large-xlsr-53-english/) or --wav2vec DIR")
    return find_wav2vec(Path(req.wav2vec if req.wav2vec is not None else req.ckpt_dir))


def offload_config(placement: Placement, req: Request, device: torch.device, hw: Hardware,
                   experts: dict[str, Component], task: str, quant, warnings: list[str]) -> OffloadConfig:
    """The placement's offload choices, final: `auto` (a tiny task, or no plan) keeps one whole expert on the
    device when the largest fits in 70 % of the free VRAM (always on the CPU), otherwise streams blocks; block
    offload's host memory falls back from pinned to mmap when the weights do not fit in free RAM, and from
    mmap to disk when loading quantizes (mmap would re-quantize every block at every step)."""
    mode, ram_mode = placement.offload, placement.ram_mode
    if mode == "auto":
        mode = "model"
        if device.type == "cuda":
            free = hw.vram_free
            largest = max(sum(Path(p).stat().st_size for p in comp.files) for comp in experts.values())
            mode = "block" if largest > 0.7 * free else "model"
    if mode == "block" and ram_mode == "pinned" and experts:
        need = host_bytes(experts, task, quant)
        free = hw.ram_available
        if need > 0.9 * free:
            warnings.append(f"--ram_mode pinned needs {need / 1e9:.1f} GB of RAM for the transformer weights but "
                            f"{free / 1e9:.1f} GB are free; using --ram_mode mmap instead")
            ram_mode = "mmap"
    if mode == "block" and ram_mode == "mmap" and converts_on_load(quant):
        warnings.append(f"--ram_mode mmap would re-quantize every block to {quant.name} at every step; using "
                        "--ram_mode disk (quantized once into a cache) instead")
        ram_mode = "disk"
    return OffloadConfig(mode, resident_blocks=placement.resident_blocks, prefetch=placement.prefetch,
                         ram_mode=ram_mode, cache_dir=req.offload_cache)


def lora_plan(role: str, lora_set, mode: str, offload: OffloadConfig) -> LoraPlan:
    """One expert's LoRAs as they will apply. Block offload that re-reads blocks (mmap, disk) binds them into
    fixed shells, so the embeddings and head take their LoRAs merged; mmap reads every block at every step,
    so its blocks take them as branches rather than merging them again and again."""
    rereads = offload.mode == "block" and offload.ram_mode in ("mmap", "disk")
    if rereads and offload.ram_mode == "mmap":
        mode = "runtime"
    return LoraPlan(role, tuple((str(f.path), strength) for f, strength in lora_set.loras), mode, rereads)


def step_cache_config(req: Request, config, settings: Settings, experts: dict[str, Component], num_blocks: int,
                      warnings: list[str], parallel: ParallelPlan | None = None):
    """The step cache to run, or None: off, or a distilled schedule (<= 8 steps) without --cache_force. A
    MagCache without a curve gets this model's calibration."""
    from wanlite.cache import MIN_CACHED_STEPS, CalibrateConfig, MagCacheConfig

    if config is None:
        return None
    config.check(num_blocks)
    if parallel is not None and isinstance(config, CalibrateConfig):
        raise WanliteError("--cache calibrate records a curve on one GPU; run it without torchrun / --ulysses_size")
    if isinstance(config, MagCacheConfig) and config.curve is None:
        curve = magcache_file(settings.task, experts, reading=True)
        if not curve.is_file():
            raise WanliteError(f"no MagCache calibration for this {settings.task} model ({curve}); run the same "
                               "command once with --cache calibrate")
        config = replace(config, curve=str(curve))
    if settings.steps < MIN_CACHED_STEPS and not req.cache_force and not isinstance(config, CalibrateConfig):
        warnings.append(f"step caching is off for a {settings.steps}-step schedule (distilled steps differ too "
                        "much to reuse); --cache_force caches anyway")
        return None
    return config


def magcache_file(task: str, experts: dict[str, Component], reading: bool = False) -> Path:
    """This model's MagCache calibration: in the user cache, keyed by the transformer files (name and size); the
    bundled tiny models fall back to the calibration shipped with them."""
    from wanlite.cache.magcache import BUNDLED, calibration_path

    ident = sorted(f"{f.resolve()}:{f.stat().st_size}" for c in experts.values() for f in c.files)
    path = calibration_path(default_cache_dir(), task, hashlib.sha256("|".join(ident).encode()).hexdigest()[:16])
    if reading and not path.is_file() and (BUNDLED / f"{task}.json").is_file():
        return BUNDLED / f"{task}.json"
    return path


def vae_tiling(tile: int | None, stride: int, latent_hw) -> Tiling | None:
    """The VAE's spatial tiles: `tile` latent pixels (0: none); by default 256-pixel tiles (where a decode's
    activations would pass a few GB), used only when the frame is larger than one tile. Neighbours share 3/8
    of a tile (96 pixels by default): with the edge-margin blend that keeps tiled within ~50 dB of untiled on
    both VAEs (bench/results/vae_tiling.json)."""
    if tile == 0:
        return None
    if tile is None:
        tile = max(4, DEFAULT_TILE_PX // stride)
        if max(latent_hw) <= tile:
            return None
    return Tiling(tile, max(1, tile * 3 // 8))


def stored_quantized(sources) -> bool:
    """True when the transformer files already hold quantized block weights (fp8, int8, GGUF): they run as
    stored, the planner does not pick another format for them. Reads headers only. ComfyUI's mxfp8 / nvfp4 /
    ConvRot int8 count as dense: no kernel here runs them, they are dequantized on load into the plan's format."""
    from wanlite.loading.scaled_file import DECODED_FORMATS

    dense = ("float32", "float16", "bfloat16", "F32", "F16", "BF16", *DECODED_FORMATS)
    return any(fmt not in dense for source in sources for key, fmt in source.formats().items() if "blocks." in key)
