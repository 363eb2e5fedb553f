"""Quality harness on the bundled tiny models: does the named colour move where the prompt says, and how far
does a variant (quantized weights, caching, tiling, offload, ...) drift from the reference run?

A variant is a dict of `generate()` keyword arguments; every variant runs the same prompts and seeds, and
each clip is compared with the reference variant's clip of the same prompt and seed (PSNR, SSIM).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wanlite.tiny.data import centroid_track, colour_masks

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEFAULT_PROMPTS = tuple((colour, direction) for colour in ("red", "blue") for direction in DIRECTIONS)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def prompt_for(colour: str, direction: str, shape: str = "square", background: str = "black") -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


PLACEMENTS = ("ahead", "against", "corner")


def first_frame(colour: str, direction: str, size: int, placement: str = "ahead", corner: int = 0,
                trail: bool = True) -> np.ndarray:
    """An image-to-video start for a prompt moving `direction`, a square on black; uint8 [size, size, 3].

    `ahead`: a quarter of the frame before the centre along the motion, so the whole motion fits, drawn like
    frame 0 of a training clip (with `trail`, the motion trail behind it); `against`: the same for the opposite
    motion, so the prompted one leaves the frame halfway. A model trained with trails, or on clips that start
    where the motion fits, can read the direction from such a frame instead of the prompt. `corner`: a still
    square in one of the two corners (`corner` 0 or 1) from which the prompted motion and one perpendicular to
    it fit alike; only the prompt can tell."""
    from wanlite.tiny.data import Clip, Sprite, render

    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if placement == "against":
        direction = OPPOSITE[direction]
    dx, dy = DIRECTIONS[direction]
    start = [size / 2 - dx * size / 4, size / 2 - dy * size / 4]
    motion = f"moving {direction}"
    if placement == "corner":
        side = size / 4 if corner == 0 else 3 * size / 4
        start[1 if dx else 0] = side  # the perpendicular axis: off centre, leaving room one way
        motion, trail = "standing still", False
    clip = Clip((Sprite(colour, "square", motion, tuple(start)),), "black", prompt_for(colour, direction))
    return render(clip, size, 1, 0.0, trail=trail)[0]


def write_first_frame(folder: Path, task: str, colour: str, direction: str, seed: int = 0, placement: str = "ahead"):
    """The image-to-video start of a suite clip as a PNG in `folder`, drawn like the bundled `task`'s training
    clips (trail or not); with `corner`, even seeds start in one corner, odd in the other. -> (path, uint8 frame)"""
    from PIL import Image

    from wanlite.specs import TASKS
    from wanlite.tiny.train import RECIPES

    frame = first_frame(colour, direction, TASKS[task].size[0], placement, seed % 2, RECIPES[task].trail)
    path = folder / f"{colour}_{direction}_{seed}_{placement}.png"
    Image.fromarray(frame).save(path)
    return path, frame


def largest_piece_share(mask: np.ndarray) -> float:
    """Fraction of a boolean [H, W] mask's pixels in its largest 4-connected piece (1 for one solid shape;
    a shape broken into n equal blobs gives 1/n). Labels spread as running minima until nothing changes."""
    if not mask.any():
        return 0.0
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        spread = labels.copy()
        spread[1:] = np.minimum(spread[1:], labels[:-1])
        spread[:-1] = np.minimum(spread[:-1], labels[1:])
        spread[:, 1:] = np.minimum(spread[:, 1:], labels[:, :-1])
        spread[:, :-1] = np.minimum(spread[:, :-1], labels[:, 1:])
        spread[~mask] = none
        if np.array_equal(spread, labels):
            break
        labels = spread
    return float(np.bincount(labels[mask]).max() / mask.sum())


@dataclass(frozen=True)
class Motion:
    dx: float  # centroid displacement from the first to the last frame where the colour is seen, pixels
    dy: float
    direction: str | None  # dominant axis and sign, None when the colour is missing or barely moves
    seen_frames: float  # fraction of frames showing the colour
    one_piece: float  # mean over those frames of the colour's share in its largest blob (1: one solid shape)

    @property
    def distance(self) -> float:
        return float(np.hypot(self.dx, self.dy))


def measure_motion(frames: np.ndarray, colour: str, min_pixels: float = 3.0) -> Motion:
    """The named colour's centroid track reduced to its net displacement and dominant direction."""
    track = centroid_track(frames, colour)
    seen = ~np.isnan(track[:, 0])
    fraction = float(seen.mean())
    masks = colour_masks(frames, colour)
    one_piece = float(np.mean([largest_piece_share(m) for m in masks[seen]])) if seen.any() else 0.0
    if seen.sum() < 2:
        return Motion(0.0, 0.0, None, fraction, one_piece)
    first, last = track[seen][0], track[seen][-1]
    dx, dy = float(last[0] - first[0]), float(last[1] - first[1])
    if max(abs(dx), abs(dy)) < min_pixels:
        return Motion(dx, dy, None, fraction, one_piece)
    if abs(dx) >= abs(dy):
        return Motion(dx, dy, "right" if dx > 0 else "left", fraction, one_piece)
    return Motion(dx, dy, "down" if dy > 0 else "up", fraction, one_piece)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _blur(x: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), -1, x)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="same"), -2, x)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma of two uint8 videos [F, H, W, 3] (Gaussian window, sigma 1.5; Wang et al. 2004)."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = (v.astype(np.float64) @ weights for v in (a, b))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _blur(x), _blur(y)
    vx, vy, cxy = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass
class ClipResult:
    variant: str
    colour: str
    direction: str
    seed: int
    measured: str | None
    distance: float
    seen_frames: float
    one_piece: float
    seconds: float
    psnr_vs_reference: float | None = None
    ssim_vs_reference: float | None = None
    denoise_seconds: float | None = None  # the sampling loop alone (no text encoder, no VAE)
    block_evals: int | None = None  # with a step cache: block forwards run / that would have run
    block_evals_total: int | None = None
    first_frame_psnr: float | None = None  # image-to-video: frame 0 against the given image

    @property
    def correct(self) -> bool:
        return self.measured == self.direction


def run_suite(variants: dict[str, dict], prompts=DEFAULT_PROMPTS, seeds=(0, 1), reference: str | None = None,
              task: str = "tiny-t2v", image: bool = False, placement: str = "ahead") -> list[ClipResult]:
    """Generate every prompt x seed for every variant; compare each clip with the reference variant's.
    `image`: image-to-video from `write_first_frame(..., placement)` of each prompt and seed (tiny-ti2v)."""
    import tempfile

    from wanlite.pipelines.pipeline import generate
    from wanlite.tiny import checkpoint_dir

    reference = reference or next(iter(variants))
    frames_of: dict[tuple, np.ndarray] = {}
    results = []
    scratch = tempfile.TemporaryDirectory(prefix="wanlite-eval-")
    for name in [reference] + [v for v in variants if v != reference]:
        for colour, direction in prompts:
            for seed in seeds:
                started = time.perf_counter()
                kwargs = dict(task=task, prompt=prompt_for(colour, direction), seed=seed, dtype="fp32",
                              output_dir=scratch.name)
                if image:
                    kwargs["image"], frame = write_first_frame(Path(scratch.name), task, colour, direction, seed,
                                                               placement)
                kwargs.update(variants[name])
                if "ckpt_dir" not in kwargs:
                    kwargs["ckpt_dir"] = checkpoint_dir(task)
                steps = []
                out = generate(**kwargs, progress=lambda e: steps.append(e) if e.get("event") == "step" else None)
                seconds = time.perf_counter() - started
                motion = measure_motion(out.frames, colour)
                result = ClipResult(name, colour, direction, seed, motion.direction, round(motion.distance, 1),
                                    round(motion.seen_frames, 3), round(motion.one_piece, 3), round(seconds, 2),
                                    denoise_seconds=round(steps[-1]["elapsed"], 4) if steps else None)
                if image:
                    result.first_frame_psnr = round(psnr(out.frames[0], frame), 2)
                if out.cache is not None:
                    result.block_evals = out.cache["block_evals"]
                    result.block_evals_total = out.cache["block_evals_total"]
                frames_of[name, colour, direction, seed] = out.frames
                ref = frames_of.get((reference, colour, direction, seed))
                if name != reference and ref is not None:
                    result.psnr_vs_reference = round(psnr(out.frames, ref), 2)
                    result.ssim_vs_reference = round(ssim(out.frames, ref), 4)
                results.append(result)
    scratch.cleanup()
    return results


def summarize(results: list[ClipResult]) -> list[dict]:
    """One row per variant: direction accuracy, mean distance, seconds per clip, PSNR/SSIM vs the reference and,
    image-to-video, the lowest PSNR of a clip's frame 0 against its given image."""
    rows = []
    for name in dict.fromkeys(r.variant for r in results):
        mine = [r for r in results if r.variant == name]
        psnrs = [r.psnr_vs_reference for r in mine if r.psnr_vs_reference is not None]
        ssims = [r.ssim_vs_reference for r in mine if r.ssim_vs_reference is not None]
        rows.append({
            "variant": name, "clips": len(mine),
            "direction_accuracy": round(sum(r.correct for r in mine) / len(mine), 3),
            "mean_distance_px": round(float(np.mean([r.distance for r in mine])), 1),
            "colour_seen_frames": round(float(np.mean([r.seen_frames for r in mine])), 3),
            "colour_in_one_piece": round(float(np.mean([r.one_piece for r in mine])), 3),
            "seconds_per_clip": round(float(np.mean([r.seconds for r in mine])), 2),
            "denoise_seconds_per_clip": (round(float(np.mean([r.denoise_seconds for r in mine])), 4)
                                         if all(r.denoise_seconds is not None for r in mine) else None),
            "block_evals_saved_x": (round(sum(r.block_evals_total for r in mine) / sum(r.block_evals for r in mine), 3)
                                    if all(r.block_evals for r in mine) else 1.0),
            "psnr_vs_reference": pooled_psnr(psnrs),
            "ssim_vs_reference": round(float(np.mean(ssims)), 4) if ssims else None,
            "first_frame_psnr_min": (min(r.first_frame_psnr for r in mine)
                                     if all(r.first_frame_psnr is not None for r in mine) else None),
        })
    return rows


def pooled_psnr(values: list[float]) -> float | None:
    """The PSNR of the clips' mean squared error (a mean of per-clip dB would be infinite as soon as one clip is
    identical to its reference); None without values, inf when every clip is identical."""
    if not values:
        return None
    mse = float(np.mean([0.0 if v == float("inf") else 255.0**2 / 10 ** (v / 10) for v in values]))
    return float("inf") if mse == 0 else round(10 * float(np.log10(255.0**2 / mse)), 2)


def as_dicts(results: list[ClipResult]) -> list[dict]:
    return [asdict(r) | {"correct": r.correct} for r in results]
