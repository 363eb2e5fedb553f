"""Train the bundled tiny models from scratch: `python -m wanlite.tiny.train [--out DIR]`.

Same classes as the real suite at toy sizes: a Wan2.1-architecture VAE + a two-expert MoE DiT (`tiny-t2v`) and
a Wan2.2-architecture VAE + one DiT doing text- and image-to-video (`tiny-ti2v`), with a frozen random tiny
umT5 encoder. Objective: rectified flow (v = noise - x0), matching the samplers. Each result is written as an
official-layout checkpoint folder, so it loads through the same loaders as the real models. Deterministic
for a given seed and thread count. By default the two models train side by side, one process and one thread
each (how the bundle was made): on 2 CPU cores both finish in about 21 minutes (bench/results/tiny_train.json).
These toy shapes keep two threads on one model from being much faster than one, so side by side beats one
after the other. The weights depend only on the seed and the threads per model: `--only` and `--serial` (one
model after the other in this process, about the two times added up) give the bundle's weights too.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanlite.loading.writers import save_pth, write_json, write_shards
from wanlite.models.dit import WanDiT
from wanlite.models.t5 import TextEncoder, build_umt5, load_tokenizer, official_name_from_umt5
from wanlite.models.vae import AttentionBlock, CausalConv3d, Resample, ResidualBlock, WanVAE
from wanlite.pipelines.samplers import shift_sigmas
from wanlite.specs import TASKS, TINY_T5, VAE_SPECS, DiTSpec
from wanlite.testing.fixtures import official_dit_config
from wanlite.testing.tokenizer import write_tiny_tokenizer
from wanlite.tiny import CHECKPOINTS
from wanlite.tiny.data import Clip, random_clip, render, to_model_video

TEXT_LEN = 32
AUX_FLOOR = 0.1


@dataclass(frozen=True)
class TinyRecipe:
    """Sizes and step counts of one bundled model."""

    task: str
    vae: str
    vae_dim: int
    vae_dec_dim: int
    vae_res_blocks: int
    vae_steps: int  # image phase
    vae_video_steps: int
    vae_crop: int
    dit: DiTSpec
    dit_steps: int
    size: int
    speed: float  # pixels per frame
    clips: int = 1024  # latent clips the DiT trains on
    dit_lr: float = 1e-3
    dit_batch: int = 24
    trail: bool = True  # clips drawn with motion trails (wanlite.tiny.data.render)
    anywhere: bool = False  # start positions independent of the motion (wanlite.tiny.data.random_clip)
    margin: float = 0.16  # starts at least this fraction of the frame from its edges (random_clip)
    sigma_shift: float = 1.0  # training sigmas uniform in the sampler's shifted time (1: uniform sigma)
    sprite_weight: float = 1.0  # loss weight of the latent elements the sprites cover (1: plain MSE)
    first_latent_scale: float = 1.0  # latent frame 0 this many times louder than the others (train_vae)
    clean_first_frame: float = 0.0  # fraction of DiT batches with latent frame 0 given clean (train_dit)
    shared_base_steps: int = 0  # MoE: one DiT trained on all sigmas first; each expert fine-tunes a copy

    def random_clip(self, rng: np.random.Generator, frames: int, two_prob: float = 0.25) -> Clip:
        """A clip drawn the way this model trains (size, speed and where the sprites start)."""
        return random_clip(rng, self.size, frames, self.speed, two_prob, anywhere=self.anywhere, margin=self.margin)


RECIPES = {
    # frame 0 emerges first and the experts learn to continue it (first_latent_scale, clean_first_frame): from
    # text, the prompted direction in 29 of 32 clips where all frames emerging together gave 2 of 16 (issue 4).
    # 1.5 px/frame: the model lays frame 0 down near the centre, and at 2 px/frame most clips from there leave the
    # frame, which it draws poorly (it turns the shape back; one DiT on the same latents: 20 of 32 at 2 px/frame,
    # 27 at 1.5). margin 0.4: starts within 6.4 px of the centre, still independent of the motion; starting
    # anywhere, the first frame's position was a wide choice the tiny DiT did not commit to, so each token laid
    # down a dot of its own (60 of 64 clips over 8 seeds, 77 % of the colour in one piece; now 64 and 99 %)
    # tiny-ti2v: with trails, a first frame already showed which way the shape goes, and the model copied the trail
    # instead of reading the prompt (image-to-video: the prompted direction in 8 to 13 of 16 clips depending on the
    # draw). Without trails, from anywhere, the prompt is the only source of the direction: 16 of 16 (issue 4).
    "tiny-t2v": TinyRecipe("tiny-t2v", "vae2.1", 8, 8, 1, 1000, 200, 32,
                           DiTSpec("t2v", dim=128, ffn_dim=256, num_heads=2, num_layers=3, in_dim=16, out_dim=16,
                                   text_dim=TINY_T5.d_model, text_len=TEXT_LEN),
                           dit_steps=500, size=64, speed=1.5, trail=False, anywhere=True, margin=0.4, sigma_shift=5.0,
                           sprite_weight=5.0, first_latent_scale=4.0, clean_first_frame=0.6,
                           shared_base_steps=3000),
    "tiny-ti2v": TinyRecipe("tiny-ti2v", "vae2.2", 8, 12, 1, 1500, 300, 48,
                            DiTSpec("ti2v", dim=128, ffn_dim=256, num_heads=2, num_layers=3, in_dim=48, out_dim=48,
                                    text_dim=TINY_T5.d_model, text_len=TEXT_LEN),
                            dit_steps=4000, size=128, speed=4.0, trail=False, anywhere=True, sigma_shift=5.0,
                            sprite_weight=5.0, clean_first_frame=0.5),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def clip_batch(rng: np.random.Generator, recipe: TinyRecipe, batch: int, frames: int):
    clips = [recipe.random_clip(rng, frames) for _ in range(batch)]
    video = torch.stack([to_model_video(render(c, recipe.size, frames, recipe.speed, recipe.trail)) for c in clips])
    return video, [c.caption for c in clips]


def init_for_training(vae: WanVAE) -> None:
    """Start as an image autoencoder applied frame by frame, as the official training init does for the temporal
    resamplers: temporal convs see only the current frame, time up/down-sampling copies frames, and every
    residual branch and attention output starts at zero. Without it the narrow tiny VAE collapses to
    input-independent latents within a few hundred steps."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, CausalConv3d) and module.kernel_size[0] > 1:
                module.weight[:, :, :-1].zero_()
            if isinstance(module, Resample) and hasattr(module, "time_conv"):
                conv = module.time_conv
                conv.weight.zero_()
                conv.bias.zero_()
                eye = torch.eye(conv.in_channels)
                for half in range(conv.out_channels // conv.in_channels):
                    conv.weight[half * conv.in_channels:(half + 1) * conv.in_channels, :, -1, 0, 0] = eye
            if isinstance(module, ResidualBlock):
                module.residual[-1].weight.zero_()
                module.residual[-1].bias.zero_()
            if isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()


def pooled_latent_target(video: torch.Tensor, stride: int) -> torch.Tensor:
    """The clip on the latent grid: 4x4-average-pooled, folded into channels (3*(stride/4)^2 of them) and
    averaged over each latent frame's pixel frames (the first alone, then groups of 4)."""
    pooled = F.avg_pool3d(video, (1, 4, 4))
    k = stride // 4
    b, c, f, h, w = pooled.shape
    pooled = pooled.view(b, c, f, h // k, k, w // k, k).permute(0, 1, 4, 6, 2, 3, 5)
    pooled = pooled.reshape(b, c * k * k, f, h // k, w // k)
    later = pooled[:, :, 1:].unflatten(2, ((f - 1) // 4, 4)).mean(dim=3)
    return torch.cat([pooled[:, :, :1], later], dim=2)


def train_vae(recipe: TinyRecipe, rng: np.random.Generator) -> WanVAE:
    """Two phases through the real chunked encode/decode. Images first (1-frame videos are ~9x cheaper), with
    the first latent channels pulled towards a pooled copy of the image early on: that gives the encoder a
    direct signal and it learns several times faster. Then short clips train the temporal layers. A light
    moment penalty keeps the normalised latents near unit scale, which the flow-matching DiT expects.
    `first_latent_scale` K > 1 asks for latent frame 0 K times louder (moments measured with it scaled back):
    its sprite then stands out of the noise earlier in sampling than the later frames', so a T2V model lays
    down the first frame first and continues it in the prompted direction, as it does from a given image."""
    spec = replace(VAE_SPECS[recipe.vae], dim=recipe.vae_dim, dec_dim=recipe.vae_dec_dim,
                   num_res_blocks=recipe.vae_res_blocks)
    vae = WanVAE(spec)
    init_for_training(vae)
    crop, stride, first_scale = recipe.vae_crop, spec.stride[1], recipe.first_latent_scale
    for phase, steps, frames, batch, lr in (("image", recipe.vae_steps, 1, 16, 1e-3),
                                             ("video", recipe.vae_video_steps, 9, 4, 3e-4)):
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        for step in range(steps):
            video, _ = clip_batch(rng, recipe, batch, frames)
            y0, x0 = (int(v) for v in rng.integers(0, recipe.size - crop + 1, 2))
            video = video[..., y0:y0 + crop, x0:x0 + crop]
            z = vae.encode(video)
            recon = vae.decode(z, clamp=False)
            unit = z if first_scale == 1 else torch.cat([z[:, :, :1] / first_scale, z[:, :, 1:]], dim=2)
            moments = unit.mean(dim=(0, 2, 3, 4)).pow(2).mean() + (unit.var(dim=(0, 2, 3, 4)) - 1).pow(2).mean()
            loss = F.l1_loss(recon, video) + F.mse_loss(recon, video) + 0.01 * moments
            # strong at first, then a floor that keeps the latents image-like (smooth, local, colour in fixed
            # channels), which the tiny DiT learns to generate far more easily than a free code
            target = pooled_latent_target(video, stride)
            target[:, :, :1] *= first_scale
            weight = max(AUX_FLOOR, 1 - step / (0.6 * steps)) if phase == "image" else AUX_FLOOR
            loss = loss + weight * F.mse_loss(z[:, :target.shape[1]], 1.5 * target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 250 == 0 or step == steps - 1:
                psnr = -10 * torch.log10(F.mse_loss(recon.detach().clamp(-1, 1), video) / 4)
                log(f"{recipe.task} vae {phase} step {step}: loss {loss.item():.4f} psnr {psnr.item():.1f} dB "
                    f"z std {z.detach().std().item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        video, _ = clip_batch(rng, recipe, 4, TASKS[recipe.task].frames)
        recon = vae.decode(vae.encode(video))
        err = (recon - video).pow(2).mean(dim=(0, 1, 3, 4))
        psnr = -10 * torch.log10(err / 4)
        log(f"{recipe.task} vae full clips: frame 0 {psnr[0]:.1f} dB, later frames {psnr[1:].mean():.1f} dB")
    return vae


def encode_dataset(vae: WanVAE, recipe: TinyRecipe, rng: np.random.Generator, clips: int, frames: int):
    latents, captions = [], []
    with torch.no_grad():
        for _ in range(clips // 16):
            video, caps = clip_batch(rng, recipe, 16, frames)
            latents.append(vae.encode(video))
            captions += caps
    return torch.cat(latents), captions


class CaptionEmbeddings:
    """Frozen tiny umT5: every caption embedded once, padded to TEXT_LEN rows."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.encoder.encode(missing)))
        return [self.cache[c] for c in captions]


def init_dit_for_training(dit: WanDiT) -> None:
    """The official init: Xavier-uniform linears with zero biases, and a zero output head so every expert
    starts by predicting zero velocity."""
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        dit.head.head.weight.zero_()
        dit.head.head.bias.zero_()


def sprite_mask(latents: torch.Tensor, first_scale: float = 1.0) -> torch.Tensor:
    """[N, 1, F, H, W]: 1 where a latent element differs from its frame's background (the per-channel spatial
    median) by more than 0.3 on average over channels (frame 0 measured at `first_scale` times that): the
    sprites, ~15 % of the elements."""
    background = latents.flatten(3).median(dim=-1).values[..., None, None]
    distance = (latents - background).abs().mean(dim=1, keepdim=True)
    distance[:, :, :1] /= first_scale
    return (distance > 0.3).float()


def train_dit(recipe: TinyRecipe, latents: torch.Tensor, captions: list[str], embed: CaptionEmbeddings,
              rng: np.random.Generator, sigma_range: tuple[float, float], name: str, steps: int | None = None,
              start: WanDiT | None = None) -> WanDiT:
    """Rectified flow on precomputed latents. A `clean_first_frame` fraction of the batches keep latent frame 0
    clean at timestep 0 and train only the other frames: TI2V image-to-video, and for a T2V model the lesson
    it needs once its first frame has emerged (continue it in the prompted direction). The direction word
    changes only the few elements a sprite covers, so under plain MSE it is drowned by the background;
    `sprite_weight` lifts them. `start`: fine-tune a copy of that model (at a third of the learning rate)
    instead of starting from the official init; `steps` defaults to the recipe's `dit_steps`."""
    torch.manual_seed(int(rng.integers(2**31)))
    steps = steps or recipe.dit_steps
    if start is None:
        dit = WanDiT(recipe.dit)
        init_dit_for_training(dit)
        lr = recipe.dit_lr
    else:
        dit = copy.deepcopy(start).train().requires_grad_(True)
        lr = recipe.dit_lr / 3
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    shift = recipe.sigma_shift
    lo, hi = (sig / (shift - (shift - 1) * sig) for sig in sigma_range)  # the range in unshifted time
    batch = recipe.dit_batch
    sprite_weight = None
    if recipe.sprite_weight != 1:
        mask = sprite_mask(latents, recipe.first_latent_scale)
        sprite_weight = 1 + (recipe.sprite_weight - 1) * mask
        log(f"{name}: sprites cover {mask.mean():.1%} of the latent elements, weighted x{recipe.sprite_weight:g}")
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(latents), batch))
        x0 = latents[idx]
        caps = ["" if rng.random() < 0.1 else captions[i] for i in idx.tolist()]  # CFG dropout
        sigma = torch.from_numpy(shift_sigmas(rng.uniform(lo, hi, batch), shift)).float()
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        t = sigma * 1000
        weight = torch.ones_like(x0) if sprite_weight is None else sprite_weight[idx].expand_as(x0).clone()
        if recipe.clean_first_frame and rng.random() < recipe.clean_first_frame:
            xt[:, :, :1] = x0[:, :, :1]
            t = t[:, None].repeat(1, x0.shape[2])
            t[:, 0] = 0
            weight[:, :, :1] = 0
        v = dit(xt, t, embed(caps))
        loss = ((v - (noise - x0)) ** 2 * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} step {step}: loss {loss.item():.4f}")
    return dit.eval().requires_grad_(False)


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # bf16 keeps the bundle small; the loaders cast on load like any released checkpoint
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def write_checkpoint(out: Path, recipe: TinyRecipe, dits: dict[str, WanDiT], vae: WanVAE, t5):
    """Official layout: expert folders (or root shards), the umT5 .pth, the VAE .pth (google/umt5-xxl/ is
    already there: training wrote the tokenizer into it)."""
    for role, dit in dits.items():
        folder = out if role == "main" else out / f"{role}_model"
        write_shards(folder, "diffusion_pytorch_model", half(dit.state_dict()), shards=1)
        write_json(official_dit_config(recipe.dit), folder / "config.json")
    t5_state = {official_name_from_umt5(k): v for k, v in t5.state_dict().items()
                if official_name_from_umt5(k) is not None}
    save_pth(half(t5_state), out / "models_t5_umt5-xxl-enc-bf16.pth")
    save_pth(half(vae.state_dict()), out / f"Wan{vae.spec.version}_VAE.pth")


def train(recipe: TinyRecipe, out: Path, seed: int) -> dict:
    name = recipe.task
    task = TASKS[name]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    tokenizer_dir = write_tiny_tokenizer(out / name / "google" / "umt5-xxl", TINY_T5.vocab_size)
    t5 = build_umt5(TINY_T5)
    with torch.no_grad():
        for p in t5.parameters():
            p.normal_(0, 0.5)  # frozen random encoder: token identity survives two random layers
    embed = CaptionEmbeddings(TextEncoder(load_tokenizer(tokenizer_dir), t5, text_len=TEXT_LEN))

    vae = train_vae(recipe, rng)
    vae_seconds = time.perf_counter() - started
    latents, captions = encode_dataset(vae, recipe, rng, clips=recipe.clips, frames=task.frames)
    log(f"{name}: {len(latents)} latent clips {tuple(latents.shape[1:])}, std {latents.std():.2f}")
    if task.boundary is None:
        dits = {"main": train_dit(recipe, latents, captions, embed, rng, (0.0, 1.0), f"{name} dit")}
    else:
        b = task.boundary
        base = None
        if recipe.shared_base_steps:
            base = train_dit(recipe, latents, captions, embed, rng, (0.0, 1.0), f"{name} base",
                             steps=recipe.shared_base_steps)
        dits = {"high_noise": train_dit(recipe, latents, captions, embed, rng, (b, 1.0), f"{name} high", start=base),
                "low_noise": train_dit(recipe, latents, captions, embed, rng, (0.0, b), f"{name} low", start=base)}
    write_checkpoint(out / name, recipe, dits, vae, t5)
    return {"task": name, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "vae_seconds": round(vae_seconds, 1)}


def train_with_threads(recipe: TinyRecipe, out: Path, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)  # in a side-by-side worker, that process's own setting
    return train(recipe, out, seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanlite.tiny.train", description=__doc__)
    parser.add_argument("--out", default=str(CHECKPOINTS), help="where the checkpoint folders go")
    parser.add_argument("--only", choices=list(RECIPES), help="train one model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model; the weights depend on it (the bundle: 1)")
    parser.add_argument("--serial", action="store_true",
                        help="train the models one after the other in this process instead of side by side")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: give at least 1")
    out = Path(args.out)
    recipes = [RECIPES[args.only]] if args.only else list(RECIPES.values())
    started = time.perf_counter()
    if not args.serial and len(recipes) > 1:
        # spawn starts alike on Windows, macOS and Linux; the recipes travel to the workers as objects
        with ProcessPoolExecutor(len(recipes), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(train_with_threads, recipe, out, args.seed, args.threads) for recipe in recipes]
            report = [job.result() for job in jobs]
    else:
        report = [train_with_threads(recipe, out, args.seed, args.threads) for recipe in recipes]
    print(json.dumps(report, indent=1))
    log(f"trained {', '.join(r.task for r in recipes)} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
