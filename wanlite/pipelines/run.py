"""execute(job) -> mp4: the one generation loop every task shares (`Pipeline.generate` resolves, then executes).

Read top to bottom: encode the text, build the task's runs (segments.py), denoise each run, decode it, write
the frames and one metadata record holding the job. Every choice was made by `resolve`; the components come
from a `Components` that keeps them between a pipeline's generations as the job says. After each step the run
state is kept (resume.py): Ctrl-C, SIGTERM or running out of memory writes it beside the output, and a
`Checkpoint` given back continues from the last finished step with the same frames.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite._version import __version__
from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import Component
from wanlite.loading.models import expert_components
from wanlite.models.attention import set_backend
from wanlite.offload import Telemetry
from wanlite.offload.memory import return_large_frees_to_os
from wanlite.pipelines.components import Components
from wanlite.pipelines.denoise import Conditioning, Denoiser
from wanlite.pipelines.job import Job
from wanlite.pipelines.request import Request, Settings
from wanlite.pipelines.resume import (CONDITIONING_FIX, T5_FIX, Checkpoint, Tracker, inject, interruptible,
                                     out_of_memory_in, set_rng_state)
from wanlite.pipelines.resolve import checkpoint_set, magcache_file
from wanlite.pipelines.segments import KINDS
from wanlite.specs import TASKS, VAE_SPECS
from wanlite.cache import StepCache
from wanlite.cache.config import describe as describe_cache
from wanlite.cache.magcache import CalibratePolicy, write_curve

Progress = Callable[[dict], None]


@dataclass
class GenerationResult:
    path: Path | None  # None: not written (save=False)
    frames: np.ndarray  # uint8 [F, H, W, 3]
    settings: Settings  # as generated (S2V: the number of clips the audio gave)
    job: Job
    preview: Path | None = None
    telemetry: Telemetry | None = None
    cache: dict | None = None  # step-cache statistics (block evaluations skipped, ...), None when off
    seconds: float = 0.0  # wall time of the generation


def execute(job: Job, path: Path | None, progress: Progress | None = None, preview: bool = False,
            components: Components | None = None, resume: Checkpoint | None = None) -> GenerationResult:
    """Run `job` and write the video to `path` (a temp file renamed when complete; None: frames only).
    `components`: what a `Pipeline` keeps loaded between generations (None: load and release here).
    `resume`: continue after the checkpoint's last finished step (resume.py).

    Raises `Interrupted` on Ctrl-C / SIGTERM and `OutOfMemory` (its `checkpoint` to resume from) when the
    device runs out of memory in a step or the decode, each with `<path>.resume.pt` written once a step has
    finished; no partial mp4 is left."""
    if components is None:
        with closing(Components()) as once:
            return execute(job, path, progress, preview, once, resume)
    with interruptible():
        return _execute(job, path, progress, preview, components, resume)


def _execute(job: Job, path: Path | None, progress: Progress | None, preview: bool, components: Components,
             resume: Checkpoint | None) -> GenerationResult:
    from wanlite.pipelines.prompt_extend import extend_job
    from wanlite.pipelines.samplers import SAMPLERS, make_sigmas, model_timesteps
    from wanlite.pipelines.video_io import Mp4Writer, contact_sheet

    started = time.perf_counter()
    return_large_frees_to_os()  # loading streams tensor by tensor; keep freed ones from piling up in the heap
    emit = progress or (lambda event: None)
    if resume is None:  # the rewritten prompt (a no-op without --use_prompt_extend, or when it already ran)
        job = extend_job(job, emit)
    for message in job.warnings:
        emit({"event": "warning", "message": message})
    emit({"event": "plan", "summary": job.summary(), "reasons": list(job.reasons)})
    set_backend(job.attention)
    settings, task = job.settings, TASKS[job.settings.task]
    device = torch.device(job.device)
    ckpt = checkpoint_set(job.weights.ckpt_dir, {flag: Path(file) for flag, file in job.weights.files})
    experts = expert_components(ckpt, task.name)
    step_cache = None if job.step_cache is None else StepCache(job.step_cache)
    sequence_parallel = None
    if job.parallel is not None:  # this rank's slice of the tokens; a step cache decides on all of them
        from wanlite.parallel import SequenceParallel, world_for

        sequence_parallel = SequenceParallel(world_for(job.parallel.ranks))
        if step_cache is not None:
            step_cache.signal_mean = sequence_parallel.mean
    if step_cache is not None and resume is not None and resume.cache is not None:
        step_cache.load_state_dict(resume.cache, device)
    telemetry = Telemetry()

    context = None  # only the decode is left: no text to encode
    if resume is None or not resume.decoding:
        emit({"event": "stage", "name": "encode text"})
        with (out_of_memory_in(f"loading or running the text encoder on {job.text_encoder.device}", T5_FIX, resume),
              components.text_encoder(job, ckpt, load_text_len(experts), emit) as encoder):
            context = encode_text(encoder, [settings.prompt, settings.negative_prompt],
                                  torch.device(job.text_encoder.device), emit)
    with out_of_memory_in("preparing the conditioning inputs", CONDITIONING_FIX, resume):
        runs = KINDS[task.conditioning].runs(
            job, task, ckpt, device, emit,
            lambda dtype: components.vae(job, ckpt, task.name, dtype, device, emit))
    settings = runs.generated(settings)
    w, h = settings.size
    vae_spec = VAE_SPECS[task.vae]
    latent_shape = (1, vae_spec.z_dim, runs.latent_frames, h // vae_spec.stride[1], w // vae_spec.stride[1])
    sigmas = make_sigmas(settings.solver, settings.steps, settings.shift)
    timesteps = model_timesteps(settings.solver, settings.steps, settings.shift).tolist()
    dits = components.transformer(job, ckpt, task.name, emit)
    dits.start(telemetry, emit, step_cache, job.chunk_tokens, job.cfg == "per_block", job.compile,
               sequence_parallel)
    loras = dits.loras
    shape = (job.settings.task, settings.size, runs.output_frames, job.vae.dtype, job.vae.tile)
    writer, pieces, cache_stats = None, [], None
    if resume is not None:
        if (resume.runs, resume.steps) != (runs.count, settings.steps):
            raise WanliteError(f"the resume file is for {resume.runs} run(s) of {resume.steps} steps; this job has "
                               f"{runs.count} of {settings.steps}: start over without it")
        pieces = list(resume.pieces)
        runs.restore(resume.parts)
    tracker = Tracker(job, path, runs, settings.steps, step_cache, pieces, device, resume)
    decoding = False
    try:
        for r in range(0 if resume is None else resume.run, runs.count):
            part = "" if runs.unit is None else f" {runs.unit} {r + 1}/{runs.count}"
            carry = resume.carry if resume is not None and r == resume.run else None
            start = 0 if carry is None else int(carry["next"])
            decoding = False
            cond = Conditioning(context=context, **runs.conditioning(r, device))
            denoiser = Denoiser(task, dits, cond, timesteps, settings.guide_scale,
                                on_expert=lambda role, step: emit({"event": "expert", "role": role, "step": step}),
                                cache=step_cache, boundary=settings.boundary, phases=settings.phases,
                                on_lora_gain=lambda gain: [setattr(s, "gain", gain) for s in loras.values()],
                                dtype=job.dtype)
            schedule = denoiser.schedule()
            if start < len(schedule):
                dits.set_schedule(schedule[start:])  # the forwards still to run
                dits(schedule[start])  # the first expert loads before the clock starts
            emit({"event": "stage", "name": f"denoise{part}", "schedule": schedule,
                  "decode_steps": components.decode_steps.get(shape) or decode_steps(job, task, runs),
                  "switch_loads": dits.loads_at_switch(schedule[start:]),
                  **({} if carry is None else {"resumed_at": start})})
            noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(settings.seed + r),
                                dtype=torch.float32)
            if carry is not None:
                set_rng_state(resume.rng, device)
            on_step = step_events(emit, schedule, telemetry, device, r, runs)
            offset = r * settings.steps

            def faulty(x, sigma, i, denoiser=denoiser, offset=offset):
                inject("step", offset + i + 1)  # a test hook; nothing unless WANLITE_FAULT is set
                return denoiser(x, sigma, i)

            def kept(info, r=r, on_step=on_step):
                tracker.step(r, info["carry"])
                on_step(info)

            denoise_started = time.perf_counter()
            with torch.no_grad():
                x = sample(SAMPLERS[settings.solver], faulty, noise.to(device), sigmas, cond.first_frame, kept,
                           resume=carry)
            step_s = (time.perf_counter() - denoise_started) / max(len(schedule) - start, 1)
            decoding = True
            if r == runs.count - 1:  # the transformer's memory goes back before the last decode
                dits.park()
                cache_stats = step_cache_stats(step_cache, telemetry)
            emit({"event": "stage", "name": f"decode{part}"})
            telemetry.sample(device)
            decode_started = time.perf_counter()
            with torch.no_grad():
                for pixels in runs.decode(r, x):
                    if writer is None and path is not None:  # opened at the first frames: its record carries
                        writer = Mp4Writer(path, (w, h), settings.fps,  # what denoising cost
                                           metadata_record(job, runs.count, telemetry, cache_stats, loras),
                                           audio=runs.audio, duration=None if runs.audio is None
                                           else runs.output_frames / settings.fps)
                        for piece in pieces:  # a resumed run's earlier parts
                            writer.append(piece)
                    room = runs.output_frames - sum(len(p) for p in pieces)
                    if room > 0:
                        pieces.append(to_uint8(pixels[0, :, :room]))
                        if writer is not None:
                            writer.append(pieces[-1])
                    inject("decode", r + 1)  # a test hook (the mp4 is open now); nothing unless WANLITE_FAULT is set
            if start < len(schedule):  # (a run resumed for its decode alone timed no step)
                components.decode_steps[shape] = (time.perf_counter() - decode_started) / max(step_s, 1e-9)
        if writer is not None:
            writer.close()
    except BaseException as exc:
        components.drop_transformer()  # a generation cut short leaves no half-run engine to reuse
        stop = tracker.stopped(exc, decoding)
        if stop is None:
            raise
        raise stop from None
    finally:
        if writer is not None and not writer.closed:
            with suppress(Exception):  # ffmpeg may be gone already (Ctrl-C reaches it too); the file goes anyway
                writer.abort()
        runs.close()
    tracker.finished()
    if step_cache is not None and isinstance(step_cache.policy, CalibratePolicy):
        cache_stats["calibration"] = str(write_curve(magcache_file(task.name, experts), task.name, settings.steps,
                                                     step_cache.policy.finished(settings.steps)))
    if cache_stats is not None:
        emit({"event": "cache", **cache_stats})
    frames = np.concatenate(pieces)
    telemetry.sample(device)
    shown = contact_sheet(frames, path.with_suffix(".png")) if preview and path is not None else None
    seconds = time.perf_counter() - started
    emit({"event": "done", "path": None if path is None else str(path), "telemetry": telemetry.to_dict(),
          "seconds": seconds})
    return GenerationResult(path, frames, settings, job, shown, telemetry, cache_stats, seconds)


def decode_steps(job: Job, task, runs) -> float:
    """A VAE decode's time in denoising steps, from their FLOPs, until one has been measured: the decode's
    fp32 convolutions run at about half the rate of the DiT's bf16 matmuls (TF32 on a GPU)."""
    from wanlite.planner.estimate import Workload, dit_flops, vae_decode_flops

    s = job.settings
    w, h = s.size
    passes = 2 if any(abs(g - 1.0) > 1e-6 for g in s.guide_scale) else 1
    work = Workload(task.name, w, h, s.frames, s.steps)
    step = dit_flops(work.spec, work.tokens, passes)
    return 2 * vae_decode_flops(task.name, h, w, runs.output_frames / runs.count) / step


def sample(sampler, denoiser: Denoiser, x: torch.Tensor, sigmas, first_frame: torch.Tensor | None, callback,
           resume: dict | None = None):
    """One denoising run (from the sampler's carry `resume`: after its last finished step); a given first frame
    (TI2V from an image) stays clean throughout."""
    if first_frame is not None:
        x[:, :, :1] = first_frame
    x = sampler(denoiser, x, sigmas, callback=callback, resume=resume)
    if first_frame is not None:
        x[:, :, :1] = first_frame
    return x


def step_events(emit: Progress, schedule: list[str], telemetry: Telemetry, device: torch.device, r: int, runs):
    """The sampler's per-step callback: a progress event with the expert phase and the time so far."""
    started = time.perf_counter()

    def on_step(info: dict) -> None:
        i = info["i"]
        role = schedule[i]
        telemetry.sample(device)
        emit({"event": "step", "i": i + 1, "total": len(schedule), "role": role,
              "role_i": schedule[: i + 1].count(role), "role_total": schedule.count(role),
              "elapsed": time.perf_counter() - started,
              **({} if runs.unit is None else {"unit": runs.unit, "part": r + 1, "parts": runs.count})})

    return on_step


def metadata_record(job: Job, runs: int, telemetry: Telemetry, cache_stats: dict | None, loras: dict) -> dict:
    """What the mp4 carries: the job that ran (its settings reproduce the video), how many denoising runs it
    took (S2V clips, Animate segments), and what it cost."""
    return {"wanlite": __version__, "job": job.to_dict(), "runs": runs, "telemetry": telemetry.to_dict(),
            "cache": cache_stats, "lora_applied": {role: s.counts for role, s in loras.items()} or None}


def step_cache_stats(step_cache: StepCache | None, telemetry: Telemetry) -> dict | None:
    if step_cache is None:
        return None
    return {**describe_cache(step_cache.config), **step_cache.stats.to_dict(),
            "bytes_not_moved_gb": telemetry.to_dict()["bytes_not_moved_gb"]}


def encode_text(encoder, prompts: list[str], device: torch.device, emit: Progress) -> list[torch.Tensor]:
    """Run umT5 once for [prompt, negative prompt]; the embeddings wait on the host for the DiT."""
    for which, prompt in zip(("prompt", "negative prompt"), prompts):
        n = encoder.count_tokens(prompt)
        if n > encoder.text_len:
            emit({"event": "warning",
                  "message": f"the {which} has {n} tokens; only the first {encoder.text_len} are used"})
    with torch.no_grad():
        return [c.float().cpu() for c in encoder.encode(prompts, device=device)]


def output_path(req: Request, settings: Settings) -> Path:
    from wanlite.pipelines.video_io import unique_path

    if req.save_file is not None:
        path = Path(req.save_file)
        if path.suffix.lower() != ".mp4":
            raise WanliteError(f"--save_file {path} must end in .mp4")
        return path
    slug = re.sub(r"[^A-Za-z0-9]+", "_", settings.prompt)[:40].strip("_") or "video"
    w, h = settings.size
    return unique_path(Path(req.output_dir), f"{settings.task}_{w}x{h}_{slug}_{settings.seed}")


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the host."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def load_text_len(experts: dict[str, Component]) -> int:
    """Text rows the DiT pads to (512 for every released model; from config.json when present)."""
    comp = next(iter(experts.values()))
    return int(comp.config.get("text_len", 512))
