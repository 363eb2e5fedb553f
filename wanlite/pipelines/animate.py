"""Animate-14B's segment loop state (official `wan/animate.py:WanAnimate.generate`): the preprocessed folder
(`src_pose.mp4`, `src_face.mp4`, `src_ref.png`, and for replacement `src_bg.mp4`, `src_mask.mp4`) cut into
segments of `clip_len` frames that overlap by `refert_num`, each conditioned on the reference image (latent
frame 0), its pose and face crops, and the previous segment's last frames (temporal guidance).

The generation loop in `run.py` stays the one every task uses; for Animate it runs once per segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanlite.errors import WanliteError
from wanlite.models.animate import AnimateConditions
from wanlite.pipelines.video_io import read_video

REFERT_CHOICES = (1, 5)


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference image scaled to fit (height, width) with its aspect kept, centred on black (the official
    `padding_resize`)."""
    from PIL import Image

    h0, w0 = image.shape[:2]
    out = np.zeros((height, width, 3), np.uint8)
    if h0 / w0 > height / width:
        new_w = int(height / h0 * w0)
        pad = (width - new_w) // 2
        out[:, pad:pad + new_w] = np.asarray(Image.fromarray(image).resize((new_w, height), Image.BILINEAR))
    else:
        new_h = int(width / w0 * h0)
        pad = (height - new_h) // 2
        out[pad:pad + new_h] = np.asarray(Image.fromarray(image).resize((width, new_h), Image.BILINEAR))
    return out


def ping_pong(frames: np.ndarray, length: int) -> np.ndarray:
    """`frames` extended to `length` by playing them back and forth (the official `inputs_padding`)."""
    order, i, step = [], 0, 1
    while len(order) < length:
        order.append(i)
        if len(frames) > 1:
            i += step
            if i in (0, len(frames) - 1):
                step = -step
    return frames[order]


def padded_length(real: int, clip_len: int, overlap: int) -> int:
    """Frames after padding so the last segment is whole (the official `get_valid_len`)."""
    stride = clip_len - overlap
    rest = (real - overlap) % stride
    return real + (stride - rest if rest else 0)


@dataclass
class AnimateSources:
    pose: np.ndarray  # uint8 [N, H, W, 3] rendered skeletons
    face: np.ndarray  # uint8 [N, S, S, 3] face crops
    ref: np.ndarray  # uint8 [H, W, 3] letterboxed character image
    bg: np.ndarray | None = None  # replacement: uint8 [N, H, W, 3], the character's region blacked out
    mask: np.ndarray | None = None  # replacement: float [N, H, W], 1 where the character is

    @property
    def frames(self) -> int:
        return len(self.pose)

    @property
    def size(self) -> tuple[int, int]:
        return self.pose.shape[2], self.pose.shape[1]


def read_sources(root: Path, replace: bool, face_size: int) -> AnimateSources:
    """The preprocessed folder, checked: every file present and readable, pose and face videos of the same
    length, face crops of the model's size, replacement videos of the pose video's size and length."""
    from wanlite.pipelines.conditioning import load_image

    root = Path(root)
    names = ["src_pose.mp4", "src_face.mp4", "src_ref.png"] + (["src_bg.mp4", "src_mask.mp4"] if replace else [])
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise WanliteError(f"--src_root_path {root}: {', '.join(missing)} missing; run `wanlite animate-prep` (or "
                           "the official preprocess_data.py) to make the folder")
    pose, _ = read_video(root / "src_pose.mp4", "pose video")
    face, _ = read_video(root / "src_face.mp4", "face video")
    if len(face) != len(pose):
        raise WanliteError(f"--src_root_path {root}: src_face.mp4 has {len(face)} frames but src_pose.mp4 has "
                           f"{len(pose)}; both come from the same preprocessing run")
    if face.shape[1:3] != (face_size, face_size):
        raise WanliteError(f"--src_root_path {root}: face crops are {face.shape[2]}x{face.shape[1]}, the model "
                           f"takes {face_size}x{face_size}")
    h, w = pose.shape[1:3]
    ref = letterbox(np.asarray(load_image(root / "src_ref.png", "the reference image")), h, w)
    sources = AnimateSources(pose, face, ref)
    if replace:
        bg, _ = read_video(root / "src_bg.mp4", "background video")
        mask, _ = read_video(root / "src_mask.mp4", "mask video")
        for name, video in (("src_bg.mp4", bg), ("src_mask.mp4", mask)):
            if video.shape[1:3] != (h, w) or len(video) != len(pose):
                raise WanliteError(f"--src_root_path {root}: {name} is {video.shape[2]}x{video.shape[1]}, "
                                   f"{len(video)} frames; src_pose.mp4 is {w}x{h}, {len(pose)} frames")
        sources.bg, sources.mask = bg, mask[..., 0].astype(np.float32) / 255
    return sources


def first_frames_mask(frames: int, lat_h: int, lat_w: int, given: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[4, F_lat, h, w]: 1 on the first `given` pixel frames (and where `keep` [frames, h, w] is 1), packed 4 pixel
    frames per latent frame with the first one repeated 4x (the official `get_i2v_mask`)."""
    msk = torch.zeros(frames, lat_h, lat_w) if keep is None else keep.clone()
    msk[:given] = 1
    msk = torch.cat([msk[:1].repeat(4, 1, 1), msk[1:]])
    return msk.view(-1, 4, lat_h, lat_w).transpose(0, 1)


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [1, 3, n, H, W] in [-1, 1]."""
    return (torch.tensor(frames).float() / 127.5 - 1).permute(3, 0, 1, 2).unsqueeze(0)


class AnimateSegments:
    """The segment loop's parts (the protocol of `speech.SpeechClips`): per segment, `conditioning(i)` (the DiT's
    y channels and AnimateConditions, rows [cond, uncond]) and `keep(i, video)` -> its new frames, which also
    give the next segment its temporal guidance."""

    unit = "segment"

    def __init__(self, sources: AnimateSources, encode, clip_features: torch.Tensor, clip_len: int,
                 refert_num: int, replace: bool):
        if refert_num not in REFERT_CHOICES:
            raise WanliteError(f"--refert_num {refert_num} must be 1 or 5 (frames each segment overlaps the "
                               "previous one)")
        if clip_len <= refert_num or (clip_len - 1) % 4:
            raise WanliteError(f"--frame_num {clip_len}: Animate segments are 4k+1 frames, more than --refert_num")
        self.encode, self.clip_len, self.refert, self.replace = encode, clip_len, refert_num, replace
        self.real = sources.frames
        total = padded_length(self.real, clip_len, refert_num)
        self.pose, self.face = ping_pong(sources.pose, total), ping_pong(sources.face, total)
        self.bg = None if not replace else ping_pong(sources.bg, total)
        self.mask = None if not replace else ping_pong(sources.mask, total)
        self.starts = list(range(0, total - refert_num, clip_len - refert_num))
        self.ref_latent = encode(_pixels(sources.ref[None]))
        self.clip_features = clip_features
        self.previous: torch.Tensor | None = None  # [1, 3, n, H, W] the last segment's frames

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def latent_frames(self) -> int:
        return (self.clip_len - 1) // 4 + 2  # the reference latent, then the segment's

    @property
    def output_frames(self) -> int:
        return self.real  # the padding is trimmed

    def conditioning(self, i: int, device) -> dict:
        s, t = self.starts[i], self.clip_len
        span = slice(s, s + t)
        given = 0 if i == 0 else self.refert
        _, _, _, lat_h, lat_w = self.ref_latent.shape
        h, w = self.pose.shape[1:3]
        guide = torch.zeros(1, 3, t, h, w)
        if self.replace:
            guide = _pixels(self.bg[span])
        if given:
            guide[:, :, :given] = self.previous[:, :, -given:]
        keep = None
        if self.replace:  # keep the background where the character is not: 1 - its mask, at latent size
            keep = 1 - F.interpolate(torch.tensor(self.mask[span])[:, None], size=(lat_h, lat_w), mode="nearest")[:, 0]
        y_ref = torch.cat([torch.ones(4, 1, lat_h, lat_w), self.ref_latent[0].cpu()], dim=0)
        y_seg = torch.cat([first_frames_mask(t, lat_h, lat_w, given, keep), self.encode(guide)[0].cpu()], dim=0)
        y = torch.cat([y_ref, y_seg], dim=1)[None].to(device)
        faces = _pixels(self.face[span])
        pose = self.encode(_pixels(self.pose[span]))
        two = lambda x: torch.cat([x, x]).to(device)  # noqa: E731
        # the unconditional row sees no face: every crop pixel at -1
        return {"y": y, "animate": AnimateConditions(two(self.clip_features), two(pose),
                                                     torch.cat([faces, torch.full_like(faces, -1)]).to(device))}

    def latents_to_decode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:]  # the reference latent is not part of the video

    def keep(self, i: int, video: torch.Tensor) -> torch.Tensor:
        """video [1, 3, clip_len, H, W] decoded from the segment's latents after the reference one."""
        self.previous = video.float().cpu()
        return video if i == 0 else video[:, :, self.refert:]
