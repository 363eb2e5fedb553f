"""LoRA on every weight format: the bundled tiny-t2v grey-background LoRA (python -m wanlite.tiny.lora) applied
merged and as a runtime branch, and the runtime branch's cost on full-size 14B shapes.

Usage: python bench/lora.py [--prompts 4] [--skip-full-size]
Per weight format (bf16, fp8, int8, GGUF Q8_0 / Q4_K): the share of grey background pixels with and without
the LoRA on "black background" prompts, and PSNR between the merged (--lora_mode merge) and the runtime
application, over whole clips and for one DiT forward (also each against the bf16 merge). Full size
(random weights, CPU, bf16): one 5120x5120 Linear on 1560 tokens with and without a rank-64 branch, and the
time to merge a rank-64 LoRA into one A14B block (x40 for an expert). Writes bench/results/lora.json.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import numpy as np
import torch

from harness import machine, write_json
from wanlite.eval import DEFAULT_PROMPTS, prompt_for, psnr

FORMATS = {"bf16": "none", "fp8": "fp8", "int8": "int8", "gguf-q8_0": "gguf-q8_0", "gguf-q4_k": "gguf-q4_k"}


def grey_share(frames: np.ndarray) -> float:
    """Fraction of grey pixels: unsaturated (channels within 40 of each other) and mid-bright (mean 60-170), as
    the training background (110, 110, 110) and unlike black or a coloured shape."""
    f = frames.astype(np.int16)
    mean = f.mean(axis=-1)
    return float(((f.max(axis=-1) - f.min(axis=-1) < 40) & (mean >= 60) & (mean <= 170)).mean())


def tiny_rows(prompts: int) -> list[dict]:
    from wanlite import generate
    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.lora import LORA_DIR

    lora = dict(lora_high=(str(LORA_DIR / "high_noise_model.safetensors"),),
                lora_low=(str(LORA_DIR / "low_noise_model.safetensors"),))
    rows = []
    for fmt, quant in FORMATS.items():
        shares = {"none": [], "merge": [], "runtime": []}
        agreement = []
        for colour, direction in DEFAULT_PROMPTS[::2][:prompts]:  # red and blue, every direction
            kw = dict(task="tiny-t2v", prompt=prompt_for(colour, direction), ckpt_dir=checkpoint_dir("tiny-t2v"),
                      seed=0, quant=quant, output_dir="/tmp/wanlite-bench-lora")
            base = generate(**kw).frames
            merged = generate(**kw, **lora, lora_mode="merge").frames
            runtime = generate(**kw, **lora, lora_mode="runtime").frames
            shares["none"].append(grey_share(base))
            shares["merge"].append(grey_share(merged))
            shares["runtime"].append(grey_share(runtime))
            agreement.append(psnr(merged, runtime))
        row = {"format": fmt, "clips": prompts, "grey_share_without": round(float(np.mean(shares["none"])), 3),
               "grey_share_merged": round(float(np.mean(shares["merge"])), 3),
               "grey_share_runtime": round(float(np.mean(shares["runtime"])), 3),
               "merged_vs_runtime_psnr_db": round(float(np.mean(agreement)), 2), **one_forward(quant)}
        print(f"{fmt:10s} grey background: {row['grey_share_without']:.3f} without, {row['grey_share_merged']:.3f} "
              f"merged, {row['grey_share_runtime']:.3f} runtime; merged vs runtime "
              f"{row['merged_vs_runtime_psnr_db']:.1f} dB (videos), {row['forward_merged_vs_runtime_db']:.1f} dB "
              f"(one forward; vs the fp32 merge: merged {row['forward_merged_vs_fp32_db']:.1f}, runtime "
              f"{row['forward_runtime_vs_fp32_db']:.1f}; the format without LoRA "
              f"{row['forward_format_without_lora_db']:.1f})", flush=True)
        rows.append(row)
    return rows


def one_forward(quant: str) -> dict:
    """SQNR (dB) of one high-noise DiT forward (t = 900, fixed random inputs) between the merged and the runtime
    application in `quant`, and of each against the fp32 weights with the LoRA merged in fp32: the per-step
    agreement, before 20 sampling steps compound it. Beside them the format's own floor: `quant` without the
    LoRA against fp32 without it."""
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit
    from wanlite.lora import lora_sets
    from wanlite.quant import parse_quant
    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.lora import LORA_DIR

    comp = {"high_noise": expert_components(discover(checkpoint_dir("tiny-t2v")), "tiny-t2v")["high_noise"]}
    files = [str(LORA_DIR / "high_noise_model.safetensors")]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 5, 8, 8, generator=g), [torch.randn(12, 64, generator=g)]
    t = torch.tensor([900.0])

    def run(mode: str | None, fmt: str | None, dtype=torch.bfloat16) -> torch.Tensor:
        lora = None if mode is None else lora_sets(files, [], [], comp, "tiny-t2v", mode)["high_noise"]
        model = load_dit(comp["high_noise"], "tiny-t2v", dtype, parse_quant(fmt) if fmt else None, lora)
        with torch.no_grad():
            return model(x, t, context).float()

    def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
        return round(float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())), 2)

    reference = run("merge", None, torch.float32)
    fmt = None if quant == "none" else quant
    merged, runtime = run("merge", fmt), run("runtime", fmt)
    return {"forward_merged_vs_runtime_db": sqnr(merged, runtime), "forward_merged_vs_fp32_db": sqnr(reference, merged),
            "forward_runtime_vs_fp32_db": sqnr(reference, runtime),
            "forward_format_without_lora_db": sqnr(run(None, None, torch.float32), run(None, fmt))}


def full_size_rows(rank: int = 64, tokens: int = 1560, reps: int = 5) -> dict:
    """bf16 on the CPU: the branch's cost per Linear, and merging one block."""
    from wanlite.specs import DIT_SPECS

    spec = DIT_SPECS["t2v-A14B"]
    d, f = spec.dim, spec.ffn_dim
    torch.manual_seed(0)
    x = torch.randn(tokens, d, dtype=torch.bfloat16)
    weight = torch.randn(d, d, dtype=torch.bfloat16) * 0.01
    down = torch.randn(rank, d, dtype=torch.bfloat16) * 0.01
    up = torch.randn(d, rank, dtype=torch.bfloat16) * 0.01

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - started) / reps

    plain = timed(lambda: torch.nn.functional.linear(x, weight))
    branched = timed(lambda: torch.nn.functional.linear(x, weight) + (x @ down.T) @ up.T)
    shapes = [(d, d)] * 8 + [(f, d), (d, f)]  # one block: 4 self-attn, 4 cross-attn, the FFN pair
    weights = [torch.randn(o, i, dtype=torch.bfloat16) for o, i in shapes]
    pairs = [(torch.randn(rank, i), torch.randn(o, rank)) for o, i in shapes]

    def merge_block() -> None:
        for w, (a, b) in zip(weights, pairs):
            w.copy_((w.float() + b @ a).to(w.dtype))

    merge_s = timed(merge_block)
    out = {"rank": rank, "tokens": tokens, "linear_seconds": round(plain, 5),
           "linear_with_branch_seconds": round(branched, 5), "branch_overhead": round(branched / plain - 1, 4),
           "merge_one_block_seconds": round(merge_s, 3), "merge_one_expert_seconds": round(40 * merge_s, 1)}
    print(f"full-size 5120x5120 Linear, {tokens} tokens: {plain * 1e3:.1f} ms, with a rank-{rank} branch "
          f"{branched * 1e3:.1f} ms (+{out['branch_overhead']:.1%}); merging one A14B block {merge_s:.2f} s "
          f"(an expert: ~{out['merge_one_expert_seconds']} s)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    result = {"command": "python bench/lora.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(),
              "note": "tiny-t2v, bundled grey-background LoRA (rank 4, one file per expert), seed 0, 20 steps",
              "tiny": tiny_rows(args.prompts)}
    if not args.skip_full_size:
        result["full_size"] = full_size_rows()
    write_json("lora", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
