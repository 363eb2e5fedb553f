"""Train the bundled tiny LoRA: tiny-t2v learns to paint "black background" prompts grey.

    python -m wanlite.tiny.lora [--steps 400] [--rank 4] [--out wanlite/tiny/loras]

The base model is frozen; each expert gets rank-r pairs on every block Linear (up starts at zero, so training
starts from the base model) trained with the base model's rectified-flow loss on clips whose background is
grey while their caption says black. The pairs are written like Wan2.2-Lightning's releases: one native-format
file per expert (`high_noise_model.safetensors`, `low_noise_model.safetensors`) with `lora_down` / `lora_up` /
`alpha`. A visible, measurable change (the background's brightness) for the LoRA benchmark and tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wanlite.tiny.data import render, to_model_video

if TYPE_CHECKING:
    from wanlite.tiny.train import TinyRecipe

LORA_DIR = Path(__file__).parent / "loras" / "tiny-t2v-grey-background"
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def grey_clips(rng: np.random.Generator, count: int, recipe: TinyRecipe, frames: int):
    """Clips like the base model's training clips (`recipe`), rendered on grey, captioned as if on black (what
    the LoRA teaches)."""
    videos, captions = [], []
    for _ in range(count):
        clip = recipe.random_clip(rng, frames)
        grey = dataclasses.replace(clip, background="grey")
        videos.append(to_model_video(render(grey, recipe.size, frames, recipe.speed, recipe.trail)))
        captions.append(clip.caption.replace("grey background", "black background"))
    return torch.stack(videos), captions


def train(steps: int = 400, rank: int = 4, seed: int = 0, lr: float = 1e-3, batch: int = 8) -> dict:
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit, load_t5, load_vae
    from wanlite.models.t5 import TextEncoder, load_tokenizer
    from wanlite.specs import TASKS
    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.train import RECIPES, CaptionEmbeddings

    task, recipe = "tiny-t2v", RECIPES["tiny-t2v"]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ckpt = discover(checkpoint_dir(task))
    vae = load_vae(ckpt.vae, task)
    t5 = load_t5(ckpt.t5, torch.float32)
    embed = CaptionEmbeddings(TextEncoder(load_tokenizer(ckpt.tokenizer), t5, text_len=recipe.dit.text_len))
    frames = TASKS[task].frames
    with torch.no_grad():
        latents, captions = [], []
        for _ in range(16):
            video, caps = grey_clips(rng, 16, recipe, frames)
            latents.append(vae.encode(video))
            captions += caps
        latents = torch.cat(latents)
    boundary = TASKS[task].boundary
    pairs = {}
    for role, comp in expert_components(ckpt, task).items():
        model = load_dit(comp, task, torch.float32)
        lo, hi = (boundary, 1.0) if role == "high_noise" else (0.0, boundary)
        pairs[role] = _train_expert(model, latents, captions, embed, rng, (lo, hi), rank, steps, lr, batch, role)
    return pairs


def _train_expert(model, latents, captions, embed, rng, sigma_range, rank, steps, lr, batch, role):
    model.requires_grad_(False)
    downs, ups, handles = {}, {}, []
    for i in range(len(model.blocks)):
        for name in LINEARS:
            full = f"blocks.{i}.{name}"
            linear = model.get_submodule(full)
            down = torch.nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features**0.5)
            up = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
            downs[full], ups[full] = down, up
            handles.append(linear.register_forward_hook(
                lambda m, args, out, d=down, u=up: out + (args[0] @ d.T) @ u.T))
    params = [*downs.values(), *ups.values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lo, hi = sigma_range
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(latents), batch))
        x0 = latents[idx]
        sigma = torch.from_numpy(rng.uniform(lo, hi, batch)).float()
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        caps = ["" if rng.random() < 0.1 else captions[i] for i in idx.tolist()]  # CFG dropout, as the base
        v = model((1 - s) * x0 + s * noise, sigma * 1000, embed(caps))
        loss = ((v - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{time.perf_counter() - started:6.1f} s] {role} LoRA step {step}: loss {loss.item():.4f}",
                  flush=True)
    for handle in handles:
        handle.remove()
    return {name: (downs[name].detach(), ups[name].detach()) for name in downs}


def write(pairs: dict, out: Path, rank: int) -> list[Path]:
    """One native-format file per expert, alpha = rank (scale 1), written atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for role, layers in pairs.items():
        tensors = {}
        for name, (down, up) in layers.items():
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora_down.weight"] = down.to(torch.bfloat16).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.to(torch.bfloat16).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        path = out / f"{role}_model.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanlite.tiny.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(LORA_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for path in write(train(args.steps, args.rank, args.seed), Path(args.out), args.rank):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
