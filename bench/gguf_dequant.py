"""GGUF dequantization speed: wanlite's torch kernels vs gguf-py's numpy reference, on one 14B FFN weight.

Usage: python bench/gguf_dequant.py [--rows 5120 --cols 13824] [--repeats 3]
Random blocks (finite scales) of each type; both decoders must agree bit for bit before anything is timed.
Writes bench/results/gguf_dequant.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wanlite.quant.gguf_dequant import BLOCKS, dequantize
from wanlite.testing.gguf_blocks import random_blocks

BENCH_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(qtype: str, shape: tuple[int, int], repeats: int) -> dict:
    """Decode random blocks of `qtype` with both decoders: bit-exactness first, then best-of timings."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    numel = shape[0] * shape[1]
    raw = random_blocks(qtype, numel // BLOCKS[qtype][0])
    raw_t = torch.from_numpy(raw.reshape(-1))
    want = reference(raw, GGMLQuantizationType[qtype]).reshape(shape)
    exact = bool(np.array_equal(dequantize(raw_t, qtype, shape).numpy(), want))
    numpy_s = best_of(lambda: reference(raw, GGMLQuantizationType[qtype]), repeats)
    torch_s = best_of(lambda: dequantize(raw_t, qtype, shape), repeats)
    bf16_s = best_of(lambda: dequantize(raw_t, qtype, shape, dtype=torch.bfloat16), repeats)
    return {"type": qtype, "bit_exact": exact, "gguf_py_s": round(numpy_s, 3), "torch_fp32_s": round(torch_s, 3),
            "torch_bf16_out_s": round(bf16_s, 3), "gguf_py_mweights_per_s": round(numel / numpy_s / 1e6),
            "torch_mweights_per_s": round(numel / torch_s / 1e6),
            "dequant_speedup_vs_gguf_py": round(numpy_s / torch_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5120)
    parser.add_argument("--cols", type=int, default=13824)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (args.rows, args.cols)
    rows = []
    for qtype in BENCH_TYPES:
        rows.append(measure(qtype, shape, args.repeats))
        r = rows[-1]
        print(f"{qtype:5s} exact={r['bit_exact']} gguf-py {r['gguf_py_mweights_per_s']:5d} Mw/s  torch "
              f"{r['torch_mweights_per_s']:5d} Mw/s  speedup {r['dequant_speedup_vs_gguf_py']:.2f}x", flush=True)
    out = Path(__file__).resolve().parent / "results" / "gguf_dequant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python bench/gguf_dequant.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "shape": list(shape), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
