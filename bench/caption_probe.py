"""Which caption words does a bundled tiny model use? One denoising step on held-out clips, per noise level.

Usage: python bench/caption_probe.py [--task tiny-t2v|tiny-ti2v] [--first_frame] [--clips 48] [--ckpt_dir DIR]
For each sigma, the flow-matching loss of one single-sprite moving clip under its own caption, the caption with
the opposite direction, the caption with another colour, and the empty caption. A word the model uses costs
loss when it is swapped: the gap (percent of the true caption's loss) is the yardstick of how much the model
conditions on it, measured in seconds instead of a generation suite. With `first_frame` the clip's latent
frame 0 is given clean at timestep 0 (image-to-video training and sampling) and the loss covers the other
frames. Writes bench/results/caption_probe_<task>[_i2v].json.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_json  # noqa: E402

from wanlite.eval import OPPOSITE  # noqa: E402
from wanlite.loading.checkpoints import discover  # noqa: E402
from wanlite.loading.models import expert_components, load_dit, load_t5, load_vae  # noqa: E402
from wanlite.models.t5 import TextEncoder, load_tokenizer  # noqa: E402
from wanlite.specs import TASKS  # noqa: E402
from wanlite.tiny import checkpoint_dir  # noqa: E402
from wanlite.tiny.data import COLOURS, Clip, Sprite, caption_for, render, to_model_video  # noqa: E402
from wanlite.tiny.train import RECIPES, TEXT_LEN, TinyRecipe  # noqa: E402

SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def swapped(clip: Clip, direction: str | None = None, colour: str | None = None) -> str:
    s = clip.sprites[0]
    motion = f"moving {direction}" if direction else s.motion
    return caption_for((Sprite(colour or s.colour, s.shape, motion, s.start),), clip.background)


def probe(task_name: str, ckpt_dir: Path, recipe: TinyRecipe, first_frame: bool, n_clips: int = 48) -> list[dict]:
    """Per sigma: the loss under the true caption and the gaps (percent) of each swapped caption. `recipe`
    draws the held-out clips the way the model was trained (size, speed, trail, starts)."""
    task = TASKS[task_name]
    ckpt = discover(ckpt_dir)
    experts = {role: load_dit(comp, task_name, torch.float32)
               for role, comp in expert_components(ckpt, task_name).items()}
    vae = load_vae(ckpt.vae, task_name)
    encoder = TextEncoder(load_tokenizer(ckpt.tokenizer), load_t5(ckpt.t5, torch.float32), text_len=TEXT_LEN)

    rng = np.random.default_rng(2024)  # not a training seed: held-out clips
    clips = []
    while len(clips) < n_clips:
        clip = recipe.random_clip(rng, task.frames, two_prob=0.0)
        if clip.sprites[0].motion != "standing still":
            clips.append(clip)
    videos = [to_model_video(render(c, recipe.size, task.frames, recipe.speed, recipe.trail)) for c in clips]
    with torch.no_grad():
        x0 = torch.cat([vae.encode(torch.stack(videos[i:i + 16])) for i in range(0, len(clips), 16)])
    other_colour = {c: list(COLOURS)[(list(COLOURS).index(c) + 1) % len(COLOURS)] for c in COLOURS}
    captions = {
        "true": [c.caption for c in clips],
        "opposite_direction": [swapped(c, direction=OPPOSITE[c.sprites[0].motion.split()[1]]) for c in clips],
        "other_colour": [swapped(c, colour=other_colour[c.sprites[0].colour]) for c in clips],
        "empty": [""] * len(clips),
    }
    context = {name: encoder.encode(caps) for name, caps in captions.items()}
    weight = torch.ones_like(x0)
    if first_frame:
        weight[:, :, :1] = 0
    generator = torch.Generator().manual_seed(0)
    rows = []
    for sigma in SIGMAS:
        role = "main" if "main" in experts else ("high_noise" if sigma >= task.boundary else "low_noise")
        noise = torch.randn(x0.shape, generator=generator)
        xt = (1 - sigma) * x0 + sigma * noise
        t = torch.full((len(clips),), sigma * 1000)
        if first_frame:
            xt[:, :, :1] = x0[:, :, :1]
            t = t[:, None].repeat(1, x0.shape[2])
            t[:, 0] = 0
        with torch.no_grad():
            loss = {name: float((((experts[role](xt, t, ctx) - (noise - x0)) ** 2) * weight).sum() / weight.sum())
                    for name, ctx in context.items()}
        row = {"sigma": sigma, "expert": role, "loss_true": round(loss["true"], 5)}
        row.update({f"gap_{name}_pct": round(100 * (loss[name] - loss["true"]) / loss["true"], 2)
                    for name in captions if name != "true"})
        rows.append(row)
        print(f"sigma {sigma:4.2f} {role:10s} loss {loss['true']:.4f}  "
              + "  ".join(f"{k[4:-4]} {v:+6.2f}%" for k, v in row.items() if k.startswith("gap_")))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="tiny-t2v", choices=("tiny-t2v", "tiny-ti2v"))
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--first_frame", action="store_true", help="frame 0 given clean (tiny-ti2v I2V)")
    parser.add_argument("--ckpt_dir", help="a retrained folder instead of the bundled one")
    args = parser.parse_args()
    if args.clips < 1:
        parser.error(f"--clips {args.clips}: give at least 1")
    torch.set_num_threads(2)
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else checkpoint_dir(args.task)
    rows = probe(args.task, ckpt_dir, RECIPES[args.task], args.first_frame, args.clips)
    name = f"caption_probe_{args.task.replace('-', '_')}" + ("_i2v" if args.first_frame else "")
    write_json(name, {"command": "python bench/caption_probe.py " + " ".join(sys.argv[1:]),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine(), "task": args.task, "clips": args.clips,
                      "checkpoint": args.ckpt_dir or "bundled", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
