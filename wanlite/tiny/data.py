"""Procedural training clips for the bundled tiny models: coloured shapes moving on plain backgrounds.

Every clip is a pure function of its seed, so training is reproducible and evaluation knows the ground truth
(which colour moves where).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 220, 50),
           "white": (245, 245, 245)}
SHAPES = ("square", "circle")
MOTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1),
           "standing still": (0, 0)}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (110, 110, 110)}
TRAIL = ((1.2, 0.15), (0.8, 0.3), (0.4, 0.5))  # (distance behind the sprite in radii, opacity), far to near


@dataclass(frozen=True)
class Sprite:
    colour: str
    shape: str
    motion: str
    start: tuple[float, float]  # centre (x, y) in pixels at frame 0


@dataclass(frozen=True)
class Clip:
    sprites: tuple[Sprite, ...]
    background: str
    caption: str


def caption_for(sprites: tuple[Sprite, ...], background: str) -> str:
    parts = [f"a {s.colour} {s.shape} {s.motion}" for s in sprites]
    return " and ".join(parts) + f" on a {background} background"


def random_clip(rng: np.random.Generator, size: int, frames: int, speed: float, two_prob: float = 0.25,
                anywhere: bool = False, margin: float = 0.16) -> Clip:
    """One or two sprites with distinct colours, starting at least `margin` x size from the edges. Start
    positions leave room for the whole motion, or with `anywhere` they are drawn alike for every motion and a
    sprite may leave the frame: then a first frame's placement does not give the direction away (a sprite near
    the left edge would otherwise have to move right), and an image-to-video model must take it from the
    prompt."""
    count = 2 if rng.random() < two_prob else 1
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    background = str(rng.choice(list(BACKGROUNDS)))
    travel = speed * (frames - 1)
    sprites = []
    for colour in colours:
        motion = str(rng.choice(list(MOTIONS)))
        dx, dy = MOTIONS[motion]
        room = 0.0 if anywhere else travel
        edge = size * margin
        lo_x = edge + (room if dx < 0 else 0)
        hi_x = size - edge - (room if dx > 0 else 0)
        lo_y = edge + (room if dy < 0 else 0)
        hi_y = size - edge - (room if dy > 0 else 0)
        start = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
        sprites.append(Sprite(str(colour), str(rng.choice(SHAPES)), motion, start))
    sprites = tuple(sprites)
    return Clip(sprites, background, caption_for(sprites, background))


def render(clip: Clip, size: int, frames: int, speed: float, trail: bool = True) -> np.ndarray:
    """uint8 [F, H, W, 3]. With `trail` (the earlier bundles' tiny-ti2v data), a moving sprite leaves a fading
    motion-blur trail behind it, so each single frame shows its direction: a tiny-ti2v trained on it continued the
    motion a first frame's trail showed rather than the caption's direction word (bench/quality.py --placement),
    which is why both bundled recipes now set `trail=False`. The trail's blended colours fall outside
    `centroid_track`'s tolerance, so tracks follow the sprite itself."""
    background = np.array(BACKGROUNDS[clip.background], np.float32)
    video = np.empty((frames, size, size, 3), np.float32)
    video[:] = background
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    radius = size * 0.14
    for f in range(frames):
        for s in clip.sprites:
            dx, dy = MOTIONS[s.motion]
            colour = np.array(COLOURS[s.colour], np.float32)
            cx, cy = s.start[0] + dx * speed * f, s.start[1] + dy * speed * f
            behind = TRAIL if trail and (dx or dy) else ()
            for back, alpha in [(b * radius, a) for b, a in behind] + [(0.0, 1.0)]:
                x, y = cx - dx * back, cy - dy * back
                if s.shape == "circle":
                    mask = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
                else:
                    mask = (np.abs(xx - x) <= radius) & (np.abs(yy - y) <= radius)
                video[f][mask] = alpha * colour + (1 - alpha) * background
    return video.round().astype(np.uint8)


def to_model_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def colour_masks(frames: np.ndarray, colour: str, tolerance: float = 60.0) -> np.ndarray:
    """bool [F, H, W]: the pixels within `tolerance` (RGB distance) of `colour`."""
    target = np.array(COLOURS[colour], np.float32)
    return np.linalg.norm(frames.astype(np.float32) - target, axis=-1) < tolerance


def centroid_track(frames: np.ndarray, colour: str, tolerance: float = 60.0) -> np.ndarray:
    """Per-frame (x, y) centroid of the pixels close to `colour`; NaN where the colour is absent."""
    track = np.full((len(frames), 2), np.nan)
    for f, mask in enumerate(colour_masks(frames, colour, tolerance)):
        ys, xs = np.nonzero(mask)
        if len(xs) >= 3:
            track[f] = (xs.mean(), ys.mean())
    return track
