"""Peak memory and fidelity of tiled vs untiled VAE decoding, on CPU.

Usage: python bench/vae_tiling.py [--frames 2] [--only vae2.1] [--height 480]
For the full-size Wan2.1 and Wan2.2 VAEs (random weights: none can be downloaded here) at 480p and 720p, and
for the bundled tiny models' trained VAEs, each decode runs in a fresh subprocess sampled by a psutil thread
every 2 ms; peaks are over the process's RSS once the model and latents are in memory. The tiled run uses the
tiling `wanlite generate` picks by default. Writes bench/results/vae_tiling.json after every case (`--only` reruns replace their rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from harness import RESULTS, run_measured, write_json

CHILD = r"""
import torch
from wanlite.models.vae import Tiling, WanVAE
from wanlite.pipelines.resolve import vae_tiling
from wanlite.specs import VAE_SPECS
name, height, width, frames, tile, out_path = sys.argv[1:7]
torch.manual_seed(0)
if name.startswith("tiny-"):
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import load_vae
    from wanlite.tiny import checkpoint_dir
    vae = load_vae(discover(checkpoint_dir(name)).vae, name)
else:
    vae = WanVAE(VAE_SPECS[name]).eval().requires_grad_(False)
stride = vae.spec.stride[1]
z = torch.randn(1, vae.spec.z_dim, int(frames), int(height) // stride, int(width) // stride)
tiling = None if tile == "none" else (vae_tiling(None, stride, z.shape[-2:]) if tile == "default" else Tiling(*map(int, tile.split(","))))
reset_peak()
t0 = time.perf_counter()
with torch.no_grad():
    video = vae.decode(z) if tiling is None else vae.decode_tiled(z, tiling)
seconds = time.perf_counter() - t0
stop_sampling()
torch.save(video, out_path)
print(json.dumps({"seconds": seconds, "peak_over_baseline": peak[0] - baseline,
                  "tiling": None if tiling is None else [tiling.tile, tiling.overlap]}))
"""

CASES = [("vae2.1", 480, 832), ("vae2.1", 720, 1280), ("vae2.2", 480, 832), ("vae2.2", 704, 1280),
         ("tiny-t2v", 256, 256), ("tiny-ti2v", 512, 512)]


def run(name: str, height: int, width: int, frames: int, tile: str, out: Path) -> dict:
    return run_measured(CHILD, [name, height, width, frames, tile, out], interval=0.002)


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2, help="latent frames (2 = 5 video frames)")
    parser.add_argument("--only", default=None, help="one VAE name, e.g. vae2.1 or tiny-ti2v")
    parser.add_argument("--height", type=int, default=None, help="only the cases of this height (480, 704, 720)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, height, width in CASES:
            if (args.only and name != args.only) or (args.height and height != args.height):
                continue
            full = run(name, height, width, args.frames, "none", Path(tmp) / "full.pt")
            # the tiny VAEs' frames fit one default tile: tile them at a quarter of the frame instead
            tile = "default" if not name.startswith("tiny-") else "8,4"
            tiled = run(name, height, width, args.frames, tile, Path(tmp) / "tiled.pt")
            a, b = torch.load(Path(tmp) / "full.pt"), torch.load(Path(tmp) / "tiled.pt")
            psnr = float(10 * torch.log10(4 / (a - b).pow(2).mean()))
            # rows from several --only runs share the file: each keeps the command and date that measured it
            row = {"vae": name, "resolution": f"{width}x{height}", "latent_frames": args.frames,
                   "tiling": tiled["tiling"], "untiled_peak_bytes": full["peak_over_baseline"],
                   "tiled_peak_bytes": tiled["peak_over_baseline"],
                   "peak_ratio": round(tiled["peak_over_baseline"] / full["peak_over_baseline"], 3),
                   "psnr_db": round(psnr, 2), "untiled_seconds": round(full["seconds"], 2),
                   "tiled_seconds": round(tiled["seconds"], 2),
                   "predicted_over_measured": predicted_over_measured(name, height, width, tiled["tiling"],
                                                                      full["peak_over_baseline"],
                                                                      tiled["peak_over_baseline"]),
                   "command": "python bench/vae_tiling.py " + " ".join(sys.argv[1:]),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            rows.append(row)
            print(f"{name:9s} {row['resolution']:>9s} tiles {row['tiling']}: peak {row['tiled_peak_bytes'] / 2**20:7.0f} "
                  f"vs {row['untiled_peak_bytes'] / 2**20:7.0f} MiB = {row['peak_ratio']:.3f}  PSNR {psnr:6.2f} dB  "
                  f"{row['tiled_seconds']:.1f} s vs {row['untiled_seconds']:.1f} s", flush=True)
            save(rows)  # after every case: a full run takes most of an hour on 2 cores
    return 0


def predicted_over_measured(name: str, height: int, width: int, tiling, untiled: int, tiled: int):
    """[untiled, tiled] planner prediction (wanlite.planner.estimate.vae_decode_bytes) over the measured RSS
    peak; None for the tiny VAEs (the formula's per-pixel constant is the full-size decoders')."""
    from wanlite.planner.estimate import vae_decode_bytes

    if not name.startswith("vae"):
        return None
    task = "t2v-A14B" if name == "vae2.1" else "ti2v-5B"
    stride = 8 if name == "vae2.1" else 16
    return [round(vae_decode_bytes(task, height, width, 0, None) / untiled, 3),
            round(vae_decode_bytes(task, height, width, 0, tiling[0] * stride) / tiled, 3)]


def save(rows: list[dict]) -> None:
    """Merge rows into bench/results/vae_tiling.json by (vae, resolution), so `--only` reruns replace theirs."""
    out = RESULTS / "vae_tiling.json"
    kept = json.loads(out.read_text())["results"] if out.exists() else []
    fresh = {(r["vae"], r["resolution"]) for r in rows}
    merged = [r for r in kept if (r["vae"], r["resolution"]) not in fresh] + rows
    write_json("vae_tiling", {
        "note": "full-size VAEs carry random weights; predicted_over_measured is the planner's VAE estimate "
                "(untiled, tiled) over the measured RSS peak; each row records the frames it decoded and the "
                "command and date that measured it",
        "results": merged})


if __name__ == "__main__":
    sys.exit(main())
