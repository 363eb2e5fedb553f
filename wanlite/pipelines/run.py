"""generate(request) -> mp4: the one data flow every task shares (encode text, condition, denoise, decode, write)."""
from __future__ import annotations

import gc
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite import __version__
from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import CheckpointSet, Component, discover, with_components
from wanlite.loading.models import check_checkpoint, expert_components, load_dit, load_t5, load_vae
from wanlite.lora import lora_sets
from wanlite.pipelines.denoise import Conditioning, Denoiser
from wanlite.pipelines.request import Request, Settings, cache_settings, resolve
from wanlite.models.vae import Tiling
from wanlite.offload import OffloadConfig, Telemetry, load_merged_cached, merges_into_quantized
from wanlite.offload.memory import return_large_frees_to_os
from wanlite.quant import QuantConfig, parse_quant
from wanlite.quant.fp8 import Fp8WeightConfig
from wanlite.specs import DIT_SPECS, TASKS, VAE_SPECS, TaskSpec
from wanlite.cache.config import describe as describe_cache
from wanlite.cache.magcache import CalibratePolicy, write_curve

DEFAULT_TILE_PX = 256  # VAE tile side in pixels when nothing else is asked (diffusers' and ComfyUI's default too)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Progress = Callable[[dict], None]


@dataclass
class GenerationResult:
    path: Path
    frames: np.ndarray  # uint8 [F, H, W, 3]
    settings: Settings
    preview: Path | None = None
    telemetry: Telemetry | None = None
    cache: dict | None = None  # step-cache statistics (block evaluations skipped, ...), None when off


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


def release(*models) -> None:
    """Drop the last references and give the memory back before the next component needs it."""
    for m in models:
        if m is not None:
            m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Transformers:
    """The task's DiT expert(s) as the offload mode places them; `self(role)` returns a model ready to run.

    `none` keeps every expert on the device, `model` keeps one whole expert there (the other is released at
    the switch, so both are never resident), `block` streams blocks through the offload engine."""

    def __init__(self, components: dict[str, Component], task: str, dtype: torch.dtype, device: torch.device,
                 quant: QuantConfig | None, offload: OffloadConfig, telemetry: Telemetry, emit: Progress,
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
            from wanlite.offload import open_offloaded

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


def encode_text(ckpt: CheckpointSet, prompts: list[str], device: torch.device, dtype: torch.dtype,
                text_len: int, emit: Progress, quant: QuantConfig | None = None) -> list[torch.Tensor]:
    """Run umT5 once for [prompt, negative prompt], then free it before the DiT needs the memory."""
    from wanlite.models.t5 import TextEncoder, load_tokenizer

    tokenizer = load_tokenizer(ckpt.tokenizer)
    model = load_t5(ckpt.t5, dtype, quant).to(device)
    encoder = TextEncoder(tokenizer, model, text_len=text_len)
    for which, prompt in zip(("prompt", "negative prompt"), prompts):
        n = encoder.count_tokens(prompt)
        if n > text_len:
            emit({"event": "warning",
                  "message": f"the {which} has {n} tokens; only the first {text_len} are used"})
    with torch.no_grad():
        context = [c.float().cpu() for c in encoder.encode(prompts, device=device)]
    release(model)
    return context


def _output_path(req: Request, settings: Settings) -> Path:
    from wanlite.pipelines.video_io import unique_path

    if req.save_file is not None:
        path = Path(req.save_file)
        if path.suffix.lower() != ".mp4":
            raise WanliteError(f"--save_file {path} must end in .mp4")
        return path
    slug = re.sub(r"[^A-Za-z0-9]+", "_", settings.prompt)[:40].strip("_") or "video"
    w, h = settings.size
    return unique_path(Path(req.output_dir), f"{settings.task}_{w}x{h}_{slug}_{settings.seed}")


def _condition(task: TaskSpec, ckpt: CheckpointSet, settings: Settings, image, device: torch.device,
               emit: Progress, vae_tile: int | None = None):
    """Encode the image conditioning the task needs with a VAE loaded for it and released after (the DiT
    needs the memory next); returns (y, first_frame, size)."""
    from wanlite.pipelines.conditioning import best_output_size, first_frame_latent, i2v_condition, max_area_size

    size, y, first = settings.size, None, None
    if image is None:
        return y, first, size
    vae = load_vae(ckpt.vae, task.name).to(device)
    max_area = size[0] * size[1]
    emit({"event": "stage", "name": "encode image"})
    with torch.no_grad():
        stride = vae.spec.stride[1]
        if task.conditioning == "image_concat":
            size = max_area_size(image.size, max_area, stride, 2)
            tiling = vae_tiling(vae_tile, stride, (size[1] // stride, size[0] // stride))
            y = i2v_condition(vae, image, size, settings.frames, tiling)
        else:
            size = best_output_size(image.size, max_area, task.stride)
            tiling = vae_tiling(vae_tile, stride, (size[1] // stride, size[0] // stride))
            first = first_frame_latent(vae, image, size, tiling)
    release(vae)
    return y, first, size


def generate(request: Request | None = None, progress: Progress | None = None, **kwargs) -> GenerationResult:
    """Generate one video and write it as mp4.

    Args:
        request: a `Request`, or pass its fields as keyword arguments (task, prompt, ckpt_dir, ...).
        progress: optional callback receiving event dicts (stages, steps with expert phase and timing).

    Example:
        >>> from wanlite import generate
        >>> result = generate(task="ti2v-5B", prompt="a red square moving right", ckpt_dir="Wan2.2-TI2V-5B")
        >>> result.path, result.frames.shape
    """
    from wanlite.pipelines.conditioning import load_image
    from wanlite.pipelines.samplers import SAMPLERS, make_sigmas, model_timesteps
    from wanlite.pipelines.video_io import Mp4Writer, contact_sheet

    return_large_frees_to_os()  # loading streams tensor by tensor; keep freed ones from piling up in the heap
    req = request if request is not None else Request(**kwargs)
    emit = progress or (lambda event: None)
    seed = req.seed if req.seed >= 0 else secrets.randbelow(2**31)
    settings = resolve(req, seed)
    task = TASKS[settings.task]
    if req.dtype not in DTYPES:
        raise WanliteError(f"--dtype {req.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    dtype, device = DTYPES[req.dtype], pick_device(req.device)
    out_path = _output_path(req, settings)
    image = None if settings.image is None else load_image(Path(settings.image))  # fail before any loading
    speech = pose = None
    if task.conditioning == "speech":
        from wanlite.pipelines.speech import find_wav2vec, read_pose_frames, read_speech

        speech = read_speech(Path(settings.audio), task.fps)
        if settings.pose_video is not None:  # enough frames for every clip the audio can cover
            most = settings.frames * (int(speech.seconds * task.fps / settings.frames) + 2)
            pose = read_pose_frames(Path(settings.pose_video), task.fps, most)
        if req.wav2vec is None and req.ckpt_dir is None:
            raise WanliteError("s2v-14B reads speech with wav2vec2: pass --ckpt_dir (holding "
                               "wav2vec2-large-xlsr-53-english/) or --wav2vec DIR")
        wav2vec = find_wav2vec(Path(req.wav2vec if req.wav2vec is not None else req.ckpt_dir))

    parse_quant(req.quant, req.quant_backend)  # a bad --quant fails before anything is read
    ckpt = with_components(None if req.ckpt_dir is None else discover(req.ckpt_dir), req.component_files())
    found = check_checkpoint(ckpt, task.name)  # every component present and the right shape before any work
    experts = expert_components(ckpt, task.name)
    from wanlite.planner import plan_for_request

    dits_found = [prepared for label, _, prepared in found if label.startswith("transformer")]
    sources = None
    if task.conditioning == "animate":  # the preprocessed folder, read and checked before any model loads
        from wanlite.models.clip import find_clip
        from wanlite.pipelines.animate import read_sources

        find_clip(Path(req.ckpt_dir))
        sources = read_sources(Path(settings.src_root_path), settings.replace,
                               dits_found[0].model.spec.animate.face_size)
    lora_mode = req.lora_mode
    if any(gain != 1.0 for _, _, gain in settings.phases):
        if lora_mode == "merge":
            raise WanliteError(f"--preset {req.preset} switches the LoRAs off for some steps, which merged weights "
                               "cannot do; drop --lora_mode merge")
        lora_mode = "runtime"  # a phase turns the LoRA off: it must stay a branch
    on_all = list(req.lora)
    if settings.relighting_lora:  # PEFT rank 128, alpha 128: strength 1
        from wanlite.pipelines.request import RELIGHTING_LORA

        on_all.append(str(Path(req.ckpt_dir) / RELIGHTING_LORA))
    # read and checked against the model before any weight is loaded
    loras = lora_sets(on_all, list(req.lora_high), list(req.lora_low), experts, task.name, lora_mode, emit)
    prequantized = stored_quantized([p.source for p in dits_found])
    passes = 2 if any(abs(g - 1.0) > 1e-6 for g in settings.guide_scale) else 1
    branched = lora_mode == "runtime" or (lora_mode == "auto" and prequantized)
    total_rank = max((sum(f.rank for f, _ in ls.loras) for ls in loras.values()), default=0)
    lora_rank = total_rank if branched else 0
    placement = plan_for_request(req, *settings.size, settings.frames, settings.steps, device, prequantized,
                                 dits_found[0].model.spec, passes, lora_rank,
                                 total_rank if lora_mode == "auto" else 0)
    if placement.plan is not None:
        emit({"event": "plan", "summary": placement.plan.summary(), "reasons": list(placement.plan.reasons)})
    quant = parse_quant(placement.quant, req.quant_backend)
    if lora_mode == "auto" and isinstance(quant, Fp8WeightConfig):
        # e4m3 keeps 3 mantissa bits: merged into the weight, a LoRA's small update is mostly rounded away
        # (bench/results/lora.json: a third of the tiny LoRA's effect lost); as a branch it stays exact
        for lora_set in loras.values():
            lora_set.mode = "runtime"
    step_cache = make_step_cache(req, placement.cache, settings, experts, dits_found[0].model.spec.num_layers, emit)

    telemetry = Telemetry()
    emit({"event": "stage", "name": "encode text"})
    t5_device = torch.device("cpu") if placement.t5_cpu else device
    text_len = load_text_len(experts)
    context = encode_text(ckpt, [settings.prompt, settings.negative_prompt], t5_device, dtype, text_len, emit,
                          quant)

    parts = vae = tiling = None  # parts: S2V clips / Animate segments, each a denoising run of its own
    y = first_frame = None
    if task.conditioning == "speech":
        parts, vae, tiling, size = _prepare_speech(task, ckpt, req, settings, image, speech, pose, wav2vec,
                                                   device, placement.vae_tile, emit)
        settings = Settings(**{**settings.to_dict(), "num_clip": parts.count})
    elif task.conditioning == "animate":
        parts, vae, tiling, size = _prepare_animate(task, ckpt, req, settings, sources, device, placement.vae_tile,
                                                    emit)
    else:
        y, first_frame, size = _condition(task, ckpt, settings, image, device, emit, placement.vae_tile)
    if size != settings.size:
        settings = Settings(**{**settings.to_dict(), "size": size})
    w, h = size
    vae_spec = VAE_SPECS[task.vae]
    vt, vs, _ = vae_spec.stride
    latent_frames = (settings.frames - 1) // vt + 1 if parts is None else parts.latent_frames
    latent_shape = (1, vae_spec.z_dim, latent_frames, h // vs, w // vs)

    sigmas = make_sigmas(settings.solver, settings.steps, settings.shift)
    timesteps = model_timesteps(settings.solver, settings.steps, settings.shift).tolist()
    offload = offload_config(placement, req, device, experts)
    dits = Transformers(experts, task.name, dtype, device, quant, offload, telemetry, emit, placement.chunk_tokens,
                        step_cache, loras)
    count = 1 if parts is None else parts.count
    writer = None
    pieces = []  # uint8 frames, for the caller and the contact sheet (a quarter of a float video)
    vae_dtype = DTYPES[req.vae_dtype]
    plan_info = {"device": str(device), "dtype": req.dtype, "t5_device": str(t5_device),
                 "quant": req.quant if quant is None else quant.name, "vae_dtype": req.vae_dtype,
                 "offload": offload.describe(), "chunk_tokens": placement.chunk_tokens,
                 "planned": None if placement.plan is None else placement.plan.to_dict(),
                 "lora": {role: {"files": [{"file": f.path.name, "strength": s, "format": f.format}
                                           for f, s in ls.loras], "applied": ls.counts}
                          for role, ls in loras.items()} or None}
    try:
        for r in range(count):
            noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + r), dtype=torch.float32)
            fields = {"y": y} if parts is None else parts.conditioning(r, device)
            if fields.get("y") is not None:
                fields["y"] = fields["y"].to(device)
            cond = Conditioning(context=context, first_frame=None if first_frame is None else first_frame.to(device),
                                **fields)
            denoiser = Denoiser(task, dits, cond, timesteps, settings.guide_scale,
                                on_expert=lambda role, step: emit({"event": "expert", "role": role, "step": step}),
                                cache=step_cache, boundary=settings.boundary, phases=settings.phases,
                                on_lora_gain=lambda gain: [setattr(ls, "gain", gain) for ls in loras.values()])
            schedule = denoiser.schedule()
            dits.set_schedule(schedule)
            started = time.perf_counter()
            unit = None if parts is None else parts.unit

            def on_step(info: dict, schedule=schedule, started=started, r=r) -> None:
                i = info["i"]
                role = schedule[i]
                telemetry.sample(device)
                emit({"event": "step", "i": i + 1, "total": len(schedule), "role": role,
                      "role_i": schedule[: i + 1].count(role), "role_total": schedule.count(role),
                      "elapsed": time.perf_counter() - started,
                      **({} if parts is None else {"part": r + 1, "parts": count})})

            emit({"event": "stage", "name": "denoise" if parts is None else f"denoise {unit} {r + 1}/{count}",
                  "schedule": schedule})
            x = noise.to(device)
            if first_frame is not None:
                x[:, :, :1] = first_frame
            with torch.no_grad():
                x = SAMPLERS[settings.solver](denoiser, x, sigmas, callback=on_step)
                if first_frame is not None:
                    x[:, :, :1] = first_frame
            if parts is None:
                break
            emit({"event": "stage", "name": f"decode {unit} {r + 1}/{count}"})
            with torch.no_grad():
                latents = parts.latents_to_decode(r, x).to(vae_dtype)
                pixels = (torch.cat([c.cpu() for c in vae.decode_chunks(latents)], dim=2) if tiling is None
                          else vae.decode_tiled(latents, tiling, out_device="cpu"))
                new = parts.keep(r, pixels)
            if writer is None:  # opened after the first part, so its metadata carries that part's telemetry
                metadata = {**settings.to_dict(), "wanlite": __version__,
                            "plan": {**plan_info, "vae_tiling": None if tiling is None else [tiling.tile,
                                                                                            tiling.overlap]},
                            "telemetry": telemetry.to_dict()}
                writer = Mp4Writer(out_path, (w, h), settings.fps, metadata,
                                   audio=None if speech is None else speech.path,
                                   duration=None if speech is None else parts.output_frames / settings.fps)
            room = parts.output_frames - sum(len(p) for p in pieces)
            if room > 0:
                pieces.append(to_uint8(new[0, :, :room]))
                writer.append(pieces[-1])
        if writer is not None:
            writer.close()
    finally:
        if writer is not None and not writer.closed:
            writer.abort()
    dits.close()
    cache_stats = None
    if step_cache is not None:
        cache_stats = {**describe_cache(step_cache.config), **step_cache.stats.to_dict(),
                       "bytes_not_moved_gb": telemetry.to_dict()["bytes_not_moved_gb"]}
        if isinstance(step_cache.policy, CalibratePolicy):
            cache_stats["calibration"] = str(write_curve(magcache_file(task.name, experts), task.name, settings.steps,
                                                         step_cache.policy.finished(settings.steps)))
        emit({"event": "cache", **cache_stats})

    if parts is None:
        emit({"event": "stage", "name": "decode"})
        vae = load_vae(ckpt.vae, task.name, vae_dtype).to(device)
        tiling = vae_tiling(placement.vae_tile, vae.spec.stride[1], x.shape[-2:])
        telemetry.sample(device)
        metadata = {**settings.to_dict(), "wanlite": __version__,
                    "plan": {**plan_info, "cache": cache_stats,
                             "vae_tiling": None if tiling is None else [tiling.tile, tiling.overlap]},
                    "telemetry": telemetry.to_dict()}  # through denoising: the file is opened before the decode
        with torch.no_grad(), Mp4Writer(out_path, (w, h), settings.fps, metadata) as writer:
            # untiled, each latent frame's video goes to the writer as soon as it is decoded; tiles are blended
            # on the host first (each tile runs through all frames so only one tile's causal cache exists at a
            # time)
            chunks = (vae.decode_chunks(x.to(vae_dtype)) if tiling is None
                      else [vae.decode_tiled(x.to(vae_dtype), tiling, out_device="cpu")])
            for chunk in chunks:
                pieces.append(to_uint8(chunk[0]))
                writer.append(pieces[-1])
    frames = np.concatenate(pieces)
    release(vae)
    telemetry.sample(device)
    path = out_path
    preview = contact_sheet(frames, path.with_suffix(".png")) if req.preview else None
    emit({"event": "done", "path": str(path), "telemetry": telemetry.to_dict()})
    return GenerationResult(path, frames, settings, preview, telemetry, cache_stats)


def _prepare_speech(task: TaskSpec, ckpt: CheckpointSet, req: Request, settings: Settings, image, speech, pose,
                    wav2vec: Path, device: torch.device, vae_tile: int | None, emit: Progress):
    """S2V before sampling: the output size from the reference image, wav2vec2 features (wav2vec2 loaded and
    released), the VAE (kept: every clip encodes its motion history and decodes), the reference latent and
    the first motion history. Returns (SpeechClips, vae, tiling, (width, height))."""
    from wanlite.pipelines.speech import SpeechClips, cover_crop, s2v_size, speech_features

    w0, h0 = settings.size
    h, w = s2v_size(image.height, image.width, w0 * h0)
    emit({"event": "stage", "name": "encode speech"})
    features, count = speech_features(speech, wav2vec, task.fps, settings.frames, device)
    if settings.num_clip is not None:
        count = min(count, settings.num_clip)
    vae, tiling, encode = _vae_encoder(ckpt, task, req, device, vae_tile, (w, h))
    emit({"event": "stage", "name": "encode reference and motion history"})
    spec = DIT_SPECS[task.dit].s2v
    clips = SpeechClips(encode, cover_crop(np.asarray(image)[None], (w, h)), features, count, settings.frames,
                        spec.motion_frames, pose, settings.start_from_ref, (w, h),
                        max_frames=math.ceil(speech.seconds * settings.fps))
    return clips, vae, tiling, (w, h)


def _vae_encoder(ckpt: CheckpointSet, task: TaskSpec, req: Request, device: torch.device, vae_tile: int | None,
                 size: tuple[int, int]):
    """The VAE, kept for a multi-part task's whole run, its tiling, and encode(video in [-1, 1]) -> fp32 latents."""
    w, h = size
    vae = load_vae(ckpt.vae, task.name, DTYPES[req.vae_dtype]).to(device)
    stride = vae.spec.stride[1]
    tiling = vae_tiling(vae_tile, stride, (h // stride, w // stride))
    vae_dtype = next(vae.parameters()).dtype

    def encode(video: torch.Tensor) -> torch.Tensor:
        video = video.to(device, vae_dtype)
        with torch.no_grad():
            return (vae.encode(video) if tiling is None else vae.encode_tiled(video, tiling)).float()

    return vae, tiling, encode


def _prepare_animate(task: TaskSpec, ckpt: CheckpointSet, req: Request, settings: Settings, sources, device,
                     vae_tile: int | None, emit: Progress):
    """Animate before sampling: CLIP features of the reference (the image encoder loaded, run and released),
    the VAE (kept: every segment encodes its pose and guidance frames and decodes), the segment plan."""
    from wanlite.models.clip import encode_images, find_clip, load_clip_vision
    from wanlite.pipelines.animate import AnimateSegments

    emit({"event": "stage", "name": "encode reference image (CLIP)"})
    clip = load_clip_vision(find_clip(Path(req.ckpt_dir)), dtype=DTYPES[req.dtype]).to(device)
    ref = torch.tensor(sources.ref).permute(2, 0, 1)[None].float() / 127.5 - 1
    features = encode_images(clip, ref.to(device)).cpu()
    release(clip)
    vae, tiling, encode = _vae_encoder(ckpt, task, req, device, vae_tile, sources.size)
    emit({"event": "stage", "name": "encode reference latent"})
    segments = AnimateSegments(sources, encode, features, settings.frames, settings.refert_num, settings.replace)
    return segments, vae, tiling, sources.size


def magcache_file(task: str, experts: dict[str, Component], reading: bool = False) -> Path:
    """This model's MagCache calibration: in the user cache, keyed by the transformer files (name and size); the
    bundled tiny models fall back to the calibration shipped with them."""
    import hashlib

    from wanlite.cache.magcache import BUNDLED, calibration_path
    from wanlite.offload import default_cache_dir

    ident = sorted(f"{f.resolve()}:{f.stat().st_size}" for c in experts.values() for f in c.files)
    path = calibration_path(default_cache_dir(), task, hashlib.sha256("|".join(ident).encode()).hexdigest()[:16])
    if reading and not path.is_file() and (BUNDLED / f"{task}.json").is_file():
        return BUNDLED / f"{task}.json"
    return path


def make_step_cache(req: Request, name, settings: Settings, experts: dict[str, Component], num_blocks: int,
                    emit: Progress):
    """The request's StepCache, or None: off, or a distilled schedule (<= 8 steps) without --cache_force."""
    from dataclasses import replace

    from wanlite.cache import MIN_CACHED_STEPS, CalibrateConfig, MagCacheConfig, StepCache

    config = cache_settings(req, name)
    if config is None:
        return None
    config.check(num_blocks)
    if isinstance(config, MagCacheConfig) and config.curve is None:
        curve = magcache_file(settings.task, experts, reading=True)
        if not curve.is_file():
            raise WanliteError(f"no MagCache calibration for this {settings.task} model ({curve}); run the same "
                               "command once with --cache calibrate")
        config = replace(config, curve=str(curve))
    if settings.steps < MIN_CACHED_STEPS and not req.cache_force and not isinstance(config, CalibrateConfig):
        emit({"event": "warning", "message": f"step caching is off for a {settings.steps}-step schedule (distilled "
                                             "steps differ too much to reuse); --cache_force caches anyway"})
        return None
    return StepCache(config)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the host."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


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


def offload_config(placement, req: Request, device: torch.device,
                   experts: dict[str, Component]) -> OffloadConfig:
    """The placement's offload choices; `auto` (a tiny task, or no plan) keeps one whole expert on the device
    when the largest fits in 70% of the free VRAM (always on CPU), otherwise streams blocks."""
    mode = placement.offload
    if mode == "auto":
        mode = "model"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            largest = max(sum(Path(p).stat().st_size for p in comp.files) for comp in experts.values())
            mode = "block" if largest > 0.7 * free else "model"
    return OffloadConfig(mode, resident_blocks=placement.resident_blocks, prefetch=placement.prefetch,
                         ram_mode=placement.ram_mode, cache_dir=req.offload_cache)


def stored_quantized(sources) -> bool:
    """True when the transformer files already hold quantized block weights (fp8, int8, GGUF): they run as
    stored, the planner does not pick another format for them. Reads headers only."""
    dense = ("float32", "float16", "bfloat16", "F32", "F16", "BF16")
    return any(fmt not in dense for source in sources for key, fmt in source.formats().items() if "blocks." in key)


def load_text_len(experts: dict[str, Component]) -> int:
    """Text rows the DiT pads to (512 for every released model; from config.json when present)."""
    comp = next(iter(experts.values()))
    return int(comp.config.get("text_len", 512))
