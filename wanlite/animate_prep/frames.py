"""Driving-video frames: sizes by area, padding resizes and the official frame sampling."""
from __future__ import annotations

import math

from pathlib import Path

import numpy as np

from wanlite.animate_prep.common import _cv2
from wanlite.errors import WanliteError


def area_size(width: int, height: int, area: int, divisor: int = 16) -> tuple[int, int]:
    """(w, h) with the source's aspect and about `area` pixels, each a multiple of `divisor` (rounded down). The
    official `resize_by_area` always lands here: its search for a better size fails on a signature mismatch."""
    new_h = math.sqrt(area / (width / height))
    new_w = area / new_h
    w, h = int(new_w // divisor) * divisor, int(new_h // divisor) * divisor
    if w <= 0 or h <= 0:
        raise WanliteError(f"--resolution_area {area} pixels is too small for a {width}x{height} video")
    return w, h


def pad_resize(image: np.ndarray, height: int, width: int, interpolation=None) -> np.ndarray:
    """Scaled to fit (height, width) with its aspect kept, centred on black (official `padding_resize`)."""
    cv2 = _cv2()
    interpolation = cv2.INTER_LINEAR if interpolation is None else interpolation
    h0, w0 = image.shape[:2]
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    if h0 / w0 > height / width:
        new_w = int(height / h0 * w0)
        pad = int((width - new_w) / 2)
        out[:, pad:pad + new_w] = cv2.resize(image, (new_w, height), interpolation=interpolation).reshape(height, new_w, -1)
    else:
        new_h = int(width / w0 * h0)
        pad = int((height - new_h) / 2)
        out[pad:pad + new_h] = cv2.resize(image, (width, new_h), interpolation=interpolation).reshape(new_h, width, -1)
    return out


def resize_by_area(image: np.ndarray, area: int) -> np.ndarray:
    cv2 = _cv2()
    h, w = image.shape[:2]
    new_w, new_h = area_size(w, h, area)
    shrink = new_w * new_h < w * h
    return pad_resize(image, new_h, new_w, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def sample_indices(frame_count: int, video_fps: float, fps: float) -> list[int]:
    """Source frames nearest to a `fps` timeline over the video's duration (official `get_frame_indices`)."""
    target = int(frame_count / video_fps * fps)
    times = np.arange(target) / fps
    return np.clip(np.round(times * video_fps).astype(int), 0, frame_count - 1).tolist()


def read_driving_video(path: Path, fps: float) -> tuple[list[np.ndarray], float]:
    """The frames at `fps` (-1: the source rate) as RGB uint8 arrays, and that rate. Decoded as a stream that
    keeps only the frames `sample_indices` picks (a long 60 fps source never sits in memory whole); the count
    is known at the end, when the list is cut (or padded with the last frame) to it."""
    from wanlite.pipelines.video_io import video_frames

    video_fps, stream = video_frames(Path(path), "driving video")
    fps = video_fps if fps == -1 else fps
    kept, count = [], 0
    for frame in stream:
        # frame `count` is wanted once for every output time that rounds to it
        while round(len(kept) / fps * video_fps) == count:
            kept.append(frame)
        count += 1
    target = len(sample_indices(count, video_fps, fps)) if count else 0
    if target == 0:
        raise WanliteError(f"{path}: {count} frames at {video_fps:g} fps give no frame at {fps:g} fps")
    return (kept + kept[-1:] * target)[:target], fps
