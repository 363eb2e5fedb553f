"""S2V-14B's clip loop state (official `wan/speech2video.py:WanS2V.generate`): speech features cut per clip, the
reference image latent, the 73-frame motion history re-encoded after every clip, optional pose latents.

The generation loop in `run.py` stays the one every task uses; for S2V it runs once per clip, asking
`SpeechClips` for the clip's conditioning and handing back the decoded frames.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite.errors import WanliteError
from wanlite.models.s2v import S2VConditions
from wanlite.pipelines.audio import SAMPLE_RATE, SpeechEncoder, frame_features, read_audio, resample_features

FIRST_CLIP_DROP = 3  # the first clip decodes after the reference latent; its first 3 frames are dropped
REF_FRAMES_IN_HISTORY = 6  # --start_from_ref: the reference image fills the newest history frames


def s2v_size(height: int, width: int, max_area: int, divisor: int = 64) -> tuple[int, int]:
    """(H, W) for a reference image of height x width: the image's aspect scaled to the largest size whose
    round-up to multiples of `divisor` stays within `max_area` (official `get_size_less_than_area`)."""
    if height * width <= max_area:
        low, high = 0.1, 1.0
    else:
        d = divisor - 1
        a, b, c = height * width, d * (height + width), d * d - max_area
        low = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)  # the reference's bound, kept as it is
        high = math.sqrt(max_area / (height * width))
    for i in range(100):
        scale = high - (high - low) * i / 100
        h = -(-int(height * scale) // divisor) * divisor
        w = -(-int(width * scale) // divisor) * divisor
        if h * w <= max_area:
            return h, w
    aspect = width / height
    w = int((max_area * aspect) ** 0.5 // divisor * divisor)
    h = int((max_area / aspect) ** 0.5 // divisor * divisor)
    if w >= width or h >= height:
        w, h = width // divisor * divisor, height // divisor * divisor
    return h, w


def find_wav2vec(root: Path) -> Path:
    """The wav2vec2 folder inside the checkpoint (`wav2vec2-large-xlsr-53-english`, or any transformers folder
    whose config.json says wav2vec2)."""
    root = Path(root)
    if (root / "config.json").is_file() and (root / "preprocessor_config.json").is_file():
        return root  # the folder itself (--wav2vec DIR)
    named = root / "wav2vec2-large-xlsr-53-english"
    if (named / "config.json").is_file():
        return named
    for config in sorted(root.glob("*/config.json")):
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("model_type") == "wav2vec2":
                return config.parent
        except (OSError, ValueError):
            continue
    raise WanliteError(f"{root}: no wav2vec2 folder found (wav2vec2-large-xlsr-53-english/ with config.json and "
                       "the model weights); S2V reads speech with it")


def read_pose_frames(path: Path, fps: int, count: int) -> np.ndarray:
    """Up to `count` frames from the start of a pose video, sampled at about `fps` (every round(src/fps)-th
    frame, as the reference), uint8 [n, H, W, 3]."""
    from wanlite.pipelines.video_io import video_frames

    path = Path(path)
    if not path.is_file():
        raise WanliteError(f"--pose_video {path}: no such file")
    src_fps, stream = video_frames(path, "--pose_video (an mp4 of the pose sequence)")
    step = max(1, round(src_fps / fps))
    frames = []
    for i, frame in enumerate(stream):
        if i % step == 0:
            frames.append(frame)
            if len(frames) == count:
                stream.close()
                break
    if not frames:
        raise WanliteError(f"--pose_video {path}: the video has no frames")
    return np.stack(frames)


def cover_crop(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, H0, W0, 3] -> float [1, 3, n, H, W] in [-1, 1]: scaled to cover (W, H), centre-cropped."""
    import torch.nn.functional as F

    w, h = size
    x = torch.tensor(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(w / x.shape[-1], h / x.shape[-2])
    scaled = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
    x = F.interpolate(x, size=scaled, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    top, left = (scaled[0] - h) // 2, (scaled[1] - w) // 2
    return x[:, :, top:top + h, left:left + w].permute(1, 0, 2, 3).unsqueeze(0)


@dataclass
class SpeechInput:
    """The audio, read and checked before any model loads."""

    wave: np.ndarray  # float32 16 kHz mono
    path: Path

    @property
    def seconds(self) -> float:
        return self.wave.size / SAMPLE_RATE


def read_speech(path: Path, fps: int) -> SpeechInput:
    wave = read_audio(path)
    if wave.size < SAMPLE_RATE / fps:
        raise WanliteError(f"--audio {path}: {wave.size / SAMPLE_RATE * 1000:.0f} ms of sound is shorter than one "
                           f"video frame ({1000 / fps:.1f} ms); give a longer recording")
    return SpeechInput(wave, Path(path))


def speech_features(speech: SpeechInput, folder: Path, fps: int, clip_frames: int, device) -> tuple[torch.Tensor, int]:
    """wav2vec2 (loaded, run and released here, before the DiT needs the memory) -> ([1, L, C, frames], clips)."""
    encoder = SpeechEncoder(folder, device)
    states = encoder.hidden_states(speech.wave)
    del encoder
    features, clips = frame_features(resample_features(states), fps, clip_frames)
    return features[None], clips


class SpeechClips:
    """The clip loop's parts (the protocol `run.execute` drives for multi-part tasks): `count`, `latent_frames`,
    `output_frames`, `conditioning(r)` for the DiT, `latents_to_decode(r, x)` (the history's latents in front of
    the clip's, so the causal decoder continues it), `keep(r, pixels)` -> the clip's new frames, which also become
    the motion history (re-encoded) for the next clip."""

    unit = "clip"

    def __init__(self, encode, ref_pixels: torch.Tensor, features: torch.Tensor, clips: int,
                 clip_frames: int, motion_frames: int, pose: np.ndarray | None, start_from_ref: bool,
                 size: tuple[int, int], max_frames: int):
        self.encode = encode  # video [1, 3, n, H, W] in [-1, 1] -> latents (tiled when the plan says so)
        self.features, self.clips, self.clip_frames = features, clips, clip_frames
        self.size, self.pose = size, pose
        self.ref_latent = encode(ref_pixels)
        w, h = size
        self.history = torch.zeros(1, 3, motion_frames, h, w)
        if start_from_ref:
            self.history[:, :, -REF_FRAMES_IN_HISTORY:] = ref_pixels
        self.drop_first = not start_from_ref
        self.motion = encode(self.history)
        self.max_frames = max_frames  # frames past the end of the speech are not written

    @property
    def count(self) -> int:
        return self.clips

    @property
    def latent_frames(self) -> int:
        return self.clip_frames // 4

    @property
    def output_frames(self) -> int:
        return min(sum(self.frames_of(r) for r in range(self.clips)), self.max_frames)

    def first_dropped(self, r: int) -> bool:
        return self.drop_first and r == 0

    def frames_of(self, r: int) -> int:
        return self.clip_frames - (FIRST_CLIP_DROP if self.first_dropped(r) else 0)

    def conditioning(self, r: int, device) -> dict:
        """`Conditioning` fields: S2V conditions with two batch rows, [conditional, unconditional]; the
        unconditional one hears silence (zero features)."""
        f = self.clip_frames
        audio = self.features[..., r * f:(r + 1) * f]
        pose = None if self.pose is None else self._pose_latent(r)
        two = lambda t: None if t is None else torch.cat([t, t]).to(device)  # noqa: E731
        return {"s2v": S2VConditions(two(self.ref_latent), torch.cat([audio, torch.zeros_like(audio)]).to(device),
                                     None if self.first_dropped(r) else two(self.motion), two(pose))}

    def _pose_latent(self, r: int) -> torch.Tensor:
        f = self.clip_frames
        w, h = self.size
        chunk = self.pose[r * f:(r + 1) * f]
        pixels = -torch.ones(1, 3, f, h, w)  # past the pose video's end: -1 frames, as the reference
        if len(chunk):
            pixels[:, :, :len(chunk)] = cover_crop(chunk, self.size)
        # the clip's first frame is encoded twice in front (a 4k+1 video) and its latent dropped
        return self.encode(torch.cat([pixels[:, :, :1], pixels], dim=2))[:, :, 1:]

    def latents_to_decode(self, r: int, x: torch.Tensor) -> torch.Tensor:
        prefix = self.ref_latent if self.first_dropped(r) else self.motion
        return torch.cat([prefix.to(x), x], dim=2)

    def keep(self, r: int, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: the decoded [1, 3, n, H, W] of prefix + clip -> the clip's new frames; updates the history."""
        new = pixels[:, :, -self.clip_frames:]
        if self.first_dropped(r):
            new = new[:, :, FIRST_CLIP_DROP:]
        n = min(self.history.shape[2], new.shape[2])
        self.history = torch.cat([self.history[:, :, n:], new[:, :, -n:].float().cpu()], dim=2)
        if r + 1 < self.clips:
            self.motion = self.encode(self.history)
        return new
