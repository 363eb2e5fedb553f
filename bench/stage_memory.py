"""Host RAM per stage of a full-size TI2V-5B generation on this CPU machine, against the job's prediction.

Writes a synthetic TI2V-5B checkpoint in the official layout (random fp32 DiT shards streamed to disk one tensor
at a time, the bf16 umT5-XXL encoder as .pth, the Wan2.2 VAE), then runs `wanlite generate --quant fp8` on it in
a fresh subprocess. A psutil thread samples RSS every 20 ms and books it to the stage the progress events say
is running (encode text, denoise, decode). The question answered: does host memory follow the stages (each
component loaded when its stage starts and released when it ends) or their sum — the 11.4 GB umT5 held while
the 5 GB fp8 DiT loads — and does the job's predicted peak RAM hold?

Writes bench/results/stage_memory.json. Usage: python bench/stage_memory.py [--workdir DIR] [--keep]
[--size 320*320] [--frames 1] [--steps 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import run_measured, write_json

TASK = "ti2v-5B"

CHILD = r"""
from pathlib import Path
from wanlite import execute, resolve
from wanlite.pipelines.request import Request, parse_size
ckpt, out, size, frames, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def progress(event):
    if event["event"] == "stage":
        label[0] = event["name"].split(" (")[0]
t0 = time.perf_counter()
job = resolve(Request(task="ti2v-5B", prompt="a red square moving right", ckpt_dir=ckpt, size=parse_size(size),
                      frames=frames, steps=steps, seed=0, quant="fp8", device="cpu", save_file=out))
label[0] = "resolve"
execute(job, out, progress)
seconds = time.perf_counter() - t0
stop_sampling()
print(json.dumps({"seconds": seconds, "peak_rss_by_stage": peaks, "job": job.to_dict()}))
"""


def write_checkpoint(folder: Path) -> float:
    """The official TI2V-5B layout with random weights; returns GB written."""
    import torch

    from wanlite.loading.writers import SafetensorsStreamWriter, save_pth, write_json as write_config
    from wanlite.models.dit import WanDiT
    from wanlite.models.t5 import build_umt5, official_name_from_umt5
    from wanlite.models.vae import WanVAE
    from wanlite.specs import DIT_SPECS, T5_SPECS, VAE_SPECS
    from wanlite.testing.fixtures import official_dit_config
    from wanlite.testing.tokenizer import write_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    spec = DIT_SPECS[TASK]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(spec).state_dict().items()}
    keys, shards, weight_map = list(shapes), 4, {}
    per = -(-len(keys) // shards)
    for i in range(shards):  # fp32 as released, one tensor in memory at a time
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per:(i + 1) * per]
        with SafetensorsStreamWriter(folder / name, [(k, torch.float32, shapes[k]) for k in part]) as writer:
            for k in part:
                writer.write(k, torch.randn(shapes[k], generator=gen) * 0.02)
        weight_map.update(dict.fromkeys(part, name))
    write_config({"metadata": {}, "weight_map": weight_map},
                 folder / "diffusion_pytorch_model.safetensors.index.json")
    write_config(official_dit_config(spec), folder / "config.json")
    with torch.device("meta"):
        t5 = build_umt5(T5_SPECS["umt5-xxl-encoder"])
    t5_shapes = {official_name_from_umt5(k): tuple(v.shape) for k, v in t5.state_dict().items()
                 if k != "encoder.embed_tokens.weight"}
    state = {k: (torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16) for k, s in t5_shapes.items() if k}
    save_pth(state, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    del state
    vae = WanVAE(VAE_SPECS["vae2.2"])
    save_pth(dict(vae.state_dict()), folder / "Wan2.2_VAE.pth")
    write_tiny_tokenizer(folder / "google" / "umt5-xxl")
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--size", default="320*320")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wanlite-stages-"))
    ckpt = work / "Wan2.2-TI2V-5B"
    written = None
    if not (ckpt / "config.json").is_file():
        written = write_checkpoint(ckpt)
        print(f"wrote {written:.1f} GB to {ckpt}")
    measured = run_measured(CHILD, [ckpt, work / "out.mp4", args.size, args.frames, args.steps])
    predicted = measured["job"]["predicted"]
    gb = {stage: round(b / 1e9, 2) for stage, b in measured["peak_rss_by_stage"].items()}
    peak = max(gb.values())
    result = {"task": TASK, "quant": "fp8", "size": args.size, "frames": args.frames, "steps": args.steps,
              "checkpoint_gb": written, "seconds": round(measured["seconds"], 1), "peak_rss_gb_by_stage": gb,
              "peak_rss_gb": peak, "predicted_peak_ram_gb": predicted["peak_ram_gb"],
              "predicted_ram_text_encoder_gb": predicted["ram_text_encoder_gb"],
              "predicted_ram_transformer_gb": predicted["ram_transformer_gb"],
              "measured_over_predicted": round(peak / predicted["peak_ram_gb"], 3)}
    print(json.dumps(result, indent=2))
    write_json("stage_memory", result)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
