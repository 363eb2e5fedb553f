"""A task's denoising runs: what each run is conditioned on and how its latents become frames.

T2V / I2V / TI2V are one run (`OneClip`); S2V clips and Animate segments are several (`Parts`), each encoding
its history with a VAE kept for the whole job. `KINDS[task.conditioning]` builds them, so the generation loop
in run.py reads the same for every task.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import CheckpointSet
from wanlite.models.vae import Tiling
from wanlite.offload.experts import release
from wanlite.pipelines.job import DTYPES, Job
from wanlite.pipelines.request import Settings
from wanlite.specs import VAE_SPECS, TaskSpec

Progress = Callable[[dict], None]
Vaes = Callable[[torch.dtype], AbstractContextManager]  # the VAE in a dtype, on the device for a `with` block


def tiling_of(job: Job) -> Tiling | None:
    return None if job.vae.tile is None else Tiling(job.vae.tile, job.vae.overlap)


class OneClip:
    """One run. The image conditioning (I2V's concatenated channels, TI2V's clean frame 0) is encoded by the VAE
    before the DiT needs the memory; the decode takes the VAE again after the transformer is parked and
    streams frames to the writer as each latent frame is decoded."""

    unit = None
    count = 1
    audio = None

    def __init__(self, job: Job, task: TaskSpec, ckpt: CheckpointSet, device: torch.device, emit: Progress,
                 vaes: Vaes):
        self.job, self.vaes = job, vaes
        self.y = self.first_frame = None
        settings = job.settings
        vt = VAE_SPECS[task.vae].stride[0]
        self.latent_frames = (settings.frames - 1) // vt + 1
        self.output_frames = settings.frames
        if settings.image is None:
            return
        from wanlite.pipelines.conditioning import first_frame_latent, i2v_condition, load_image

        image = load_image(Path(settings.image))
        emit({"event": "stage", "name": "encode image"})
        with vaes(torch.float32) as vae, torch.no_grad():
            if task.conditioning == "image_concat":
                self.y = i2v_condition(vae, image, settings.size, settings.frames, tiling_of(job))
            else:
                self.first_frame = first_frame_latent(vae, image, settings.size, tiling_of(job))

    def generated(self, settings: Settings) -> Settings:
        return settings

    def conditioning(self, r: int, device: torch.device) -> dict:
        return {"y": None if self.y is None else self.y.to(device),
                "first_frame": None if self.first_frame is None else self.first_frame.to(device)}

    def decode(self, r: int, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Untiled, each latent frame's video as soon as it is decoded; tiles are blended on the host first (each
        tile runs through all frames, so only one tile's causal cache exists at a time)."""
        dtype = DTYPES[self.job.vae.dtype]
        tiling = tiling_of(self.job)
        with self.vaes(dtype) as vae:
            if tiling is None:
                yield from vae.decode_chunks(x.to(dtype))
            else:
                yield vae.decode_tiled(x.to(dtype), tiling, out_device="cpu")

    def state(self) -> dict:
        """What a later run reads from the earlier ones (for a resume file): nothing, there is one run."""
        return {}

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Parts:
    """Several runs (S2V clips, Animate segments) around a `parts` object of the protocol `speech.SpeechClips`
    defines, with the VAE kept between runs: each part encodes its history and decodes."""

    def __init__(self, parts, vae: torch.nn.Module, holding: ExitStack, job: Job, audio: Path | None = None):
        self.parts, self.vae, self.holding, self.job = parts, vae, holding, job
        self.audio = audio  # S2V: muxed into the mp4, which is cut to the speech's length
        self.unit, self.count = parts.unit, parts.count
        self.latent_frames, self.output_frames = parts.latent_frames, parts.output_frames

    def generated(self, settings: Settings) -> Settings:
        """The settings as generated: S2V records how many clips the audio gave."""
        return settings if self.audio is None else replace(settings, num_clip=self.count)

    def conditioning(self, r: int, device: torch.device) -> dict:
        fields = self.parts.conditioning(r, device)
        if fields.get("y") is not None:
            fields["y"] = fields["y"].to(device)
        return fields

    def decode(self, r: int, x: torch.Tensor) -> Iterator[torch.Tensor]:
        latents = self.parts.latents_to_decode(r, x).to(DTYPES[self.job.vae.dtype])
        tiling = tiling_of(self.job)
        pixels = (torch.cat([c.cpu() for c in self.vae.decode_chunks(latents)], dim=2) if tiling is None
                  else self.vae.decode_tiled(latents, tiling, out_device="cpu"))
        yield self.parts.keep(r, pixels)

    def state(self) -> dict:
        """What the next part reads from the decoded ones (for a resume file): S2V's motion history (frames and
        latents), Animate's previous segment. The tensors themselves: `keep` replaces them, never writes them."""
        return {name: getattr(self.parts, name) for name in CARRIED if getattr(self.parts, name, None) is not None}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            if name not in CARRIED:
                raise WanliteError(f"the resume file holds an unknown part state {name!r}")
            setattr(self.parts, name, value)

    def close(self) -> None:
        self.holding.close()


CARRIED = ("history", "motion", "previous")  # SpeechClips.history / .motion, AnimateSegments.previous


def _vae_encoder(job: Job, device: torch.device, vaes: Vaes):
    """The VAE, held for a multi-part task's whole run (until the `ExitStack` closes), and
    encode(video in [-1, 1]) -> fp32 latents."""
    dtype = DTYPES[job.vae.dtype]
    holding = ExitStack()
    vae = holding.enter_context(vaes(dtype))
    tiling = tiling_of(job)

    def encode(video: torch.Tensor) -> torch.Tensor:
        video = video.to(device, dtype)
        with torch.no_grad():
            return (vae.encode(video) if tiling is None else vae.encode_tiled(video, tiling)).float()

    return vae, holding, encode


def speech_clips(job: Job, task: TaskSpec, ckpt: CheckpointSet, device: torch.device, emit: Progress,
                 vaes: Vaes) -> Parts:
    """S2V: wav2vec2 features (wav2vec2 loaded and released), the VAE, the reference latent and the first
    motion history."""
    from wanlite.loading.models import expert_components, prepare_dit
    from wanlite.pipelines.conditioning import load_image
    from wanlite.pipelines.speech import SpeechClips, cover_crop, read_pose_frames, read_speech, speech_features

    settings = job.settings
    speech = read_speech(Path(settings.audio), task.fps)
    pose = None
    if settings.pose_video is not None:  # enough frames for every clip the audio can cover
        most = settings.frames * (int(speech.seconds * task.fps / settings.frames) + 2)
        pose = read_pose_frames(Path(settings.pose_video), task.fps, most)
    image = load_image(Path(settings.image))
    emit({"event": "stage", "name": "encode speech"})
    features, count = speech_features(speech, Path(job.wav2vec), task.fps, settings.frames, device)
    if settings.num_clip is not None:
        count = min(count, settings.num_clip)
    vae, holding, encode = _vae_encoder(job, device, vaes)
    emit({"event": "stage", "name": "encode reference and motion history"})
    # the checkpoint's own motion history length (its config.json's motion_frames): the DiT pads its audio by it
    spec = prepare_dit(expert_components(ckpt, task.name)["main"], task.name).model.spec.s2v
    clips = SpeechClips(encode, cover_crop(np.asarray(image)[None], settings.size), features, count, settings.frames,
                        spec.motion_frames, pose, settings.start_from_ref, settings.size,
                        max_frames=math.ceil(speech.seconds * settings.fps))
    return Parts(clips, vae, holding, job, audio=speech.path)


def animate_segments(job: Job, task: TaskSpec, ckpt: CheckpointSet, device: torch.device, emit: Progress,
                     vaes: Vaes) -> Parts:
    """Animate: CLIP features of the reference (the image encoder loaded, run and released), the VAE, the
    segment plan."""
    from wanlite.loading.models import expert_components, prepare_dit
    from wanlite.loading.clip import load_clip_vision
    from wanlite.models.clip import encode_images, find_clip
    from wanlite.pipelines.animate import AnimateSegments, read_sources

    settings = job.settings
    face_size = prepare_dit(expert_components(ckpt, task.name)["main"], task.name).model.spec.animate.face_size
    sources = read_sources(Path(settings.src_root_path), settings.replace, face_size)
    emit({"event": "stage", "name": "encode reference image (CLIP)"})
    clip = load_clip_vision(find_clip(Path(job.weights.ckpt_dir)), dtype=DTYPES[job.dtype]).to(device)
    ref = torch.tensor(sources.ref).permute(2, 0, 1)[None].float() / 127.5 - 1
    features = encode_images(clip, ref.to(device)).cpu()
    release(clip)
    vae, holding, encode = _vae_encoder(job, device, vaes)
    emit({"event": "stage", "name": "encode reference latent"})
    return Parts(AnimateSegments(sources, encode, features, settings.frames, settings.refert_num, settings.replace),
                 vae, holding, job)


def one_clip(job: Job, task: TaskSpec, ckpt: CheckpointSet, device: torch.device, emit: Progress,
             vaes: Vaes) -> OneClip:
    return OneClip(job, task, ckpt, device, emit, vaes)


def text_size(task: TaskSpec, settings: Settings, spec) -> tuple[int, int]:
    return settings.size


def image_size(task: TaskSpec, settings: Settings, spec) -> tuple[int, int]:
    """From an image, the largest size of its aspect within `--size`'s area, on the official grid per task:
    I2V-A14B's latent-and-patch multiple, TI2V-5B's 32 pixels."""
    from wanlite.pipelines.conditioning import best_output_size, load_image, max_area_size

    if settings.image is None:
        return settings.size
    image = load_image(Path(settings.image))
    area = settings.size[0] * settings.size[1]
    if task.conditioning == "image_concat":
        return max_area_size(image.size, area, VAE_SPECS[task.vae].stride[1], 2)
    return best_output_size(image.size, area, task.stride)


def speech_size(task: TaskSpec, settings: Settings, spec) -> tuple[int, int]:
    """S2V: the reference image's aspect within `--size`'s area, on a 64-pixel grid; the audio is checked now,
    not after loading."""
    from wanlite.pipelines.conditioning import load_image
    from wanlite.pipelines.speech import read_speech, s2v_size

    if settings.image is None:  # planned before there are inputs
        return settings.size
    image = load_image(Path(settings.image))
    if settings.audio is not None:
        read_speech(Path(settings.audio), task.fps)
    h, w = s2v_size(image.height, image.width, settings.size[0] * settings.size[1])
    return w, h


def animate_size(task: TaskSpec, settings: Settings, spec) -> tuple[int, int]:
    """Animate: the preprocessed videos' size (the folder read and checked before any model loads)."""
    from wanlite.pipelines.animate import read_sources

    if settings.src_root_path is None:  # planned before there are inputs
        return settings.size
    return read_sources(Path(settings.src_root_path), settings.replace, spec.animate.face_size).size


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task (`TaskSpec.conditioning`) does differently: the size of its video and its runs."""

    output_size: Callable  # (task, settings, dit spec) -> (width, height)
    runs: Callable  # (job, task, checkpoint, device, emit, vaes) -> OneClip | Parts


KINDS = {"text": TaskKind(text_size, one_clip), "image_concat": TaskKind(image_size, one_clip),
         "first_frame": TaskKind(image_size, one_clip), "speech": TaskKind(speech_size, speech_clips),
         "animate": TaskKind(animate_size, animate_segments)}
