"""bf16 VAE decoding against the official fp32: PSNR of the decoded video and peak activation memory.

Rows: the bundled tiny models' trained VAEs (64x64 / 128x128, 17 frames) and the full-size Wan2.1 / Wan2.2 VAE
architectures with random weights (none can be downloaded here) at 128x128, 9 frames. Latents are N(0, 1)
(the latent space the DiT produces). Peak memory is traced with LiveBytes (allocations, not RSS).
Writes bench/results/vae_bf16.json.  Usage: python bench/vae_bf16.py
"""
from __future__ import annotations

import datetime
import json
import math
import sys

import torch
from harness import machine, write_json


def vaes():
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import load_vae
    from wanlite.models.vae import WanVAE
    from wanlite.specs import VAE_SPECS
    from wanlite.tiny import checkpoint_dir

    for task, side in (("tiny-t2v", 64), ("tiny-ti2v", 128)):
        comp = discover(checkpoint_dir(task)).vae
        yield task, side, 5, load_vae(comp, task, torch.float32), load_vae(comp, task, torch.bfloat16)
    for name in ("vae2.1", "vae2.2"):
        torch.manual_seed(0)
        full = WanVAE(VAE_SPECS[name]).eval().requires_grad_(False)
        half = WanVAE(VAE_SPECS[name]).eval().requires_grad_(False)
        half.load_state_dict(full.state_dict())
        yield f"{name} (random weights)", 128, 3, full, half.to(torch.bfloat16)


def main() -> int:
    from wanlite.planner.memtrace import LiveBytes

    rows = []
    for name, side, latent_frames, fp32, bf16 in vaes():
        stride = fp32.spec.stride[1]
        torch.manual_seed(1)
        z = torch.randn(1, fp32.spec.z_dim, latent_frames, side // stride, side // stride)
        with torch.no_grad():
            with LiveBytes() as a:
                ref = fp32.decode(z).clamp(-1, 1)
            with LiveBytes() as b:
                got = bf16.decode(z.to(torch.bfloat16)).float().clamp(-1, 1)
        mse = float(((ref - got) ** 2).mean())
        row = {"vae": name, "resolution": f"{side}x{side}", "frames": ref.shape[2],
               "psnr_db": round(10 * math.log10(4 / mse), 2), "max_abs_diff": round(float((ref - got).abs().max()), 4),
               "peak_fp32_mb": round(a.peak / 1e6, 1), "peak_bf16_mb": round(b.peak / 1e6, 1),
               "peak_ratio": round(b.peak / a.peak, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"command": "python bench/vae_bf16.py " + " ".join(sys.argv[1:]),
           "machine": machine(),
           "date": datetime.date.today().isoformat(), "results": rows}
    write_json("vae_bf16", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
