"""Sequence parallelism's scaling shape on the CPU: one DiT forward (CFG batch 2) of a mid-size random DiT (dim
1536, 12 heads, 4 blocks: Wan 1.3B's width) on one process vs split over 2 processes (gloo, Ulysses all-to-alls
around every self-attention), each process on one thread so the ranks do not fight over the cores. On a CPU the
"GPUs" share one memory bus and the exchange is a local socket: this shows the shape (compute halves, the
all-to-alls add), not what two cards do. Also times the exchange alone (the all-to-alls of one forward).
Writes bench/results/parallel.json.
Usage: python bench/parallel.py [--tokens 4096] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import header, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward_seconds(tokens: int, repeats: int) -> dict:
    """Median seconds of one forward on this process (alone, or its rank's share under run_ranks)."""
    from wanlite import parallel
    from wanlite.models.dit import WanDiT
    from wanlite.specs import DIT_SPECS

    torch.set_num_threads(1)
    world = parallel.join(parallel.launched_ranks(), "cpu")
    torch.manual_seed(0)
    spec = replace(DIT_SPECS["t2v-A14B"], dim=1536, ffn_dim=8960, num_heads=12, num_layers=4)
    model = WanDiT(spec).eval()
    sp = None if world is None else parallel.SequenceParallel(world)
    model.sequence_parallel = sp
    side = int((tokens // 4) ** 0.5)  # 4 latent frames of side x side patches
    x = torch.randn(2, spec.out_dim, 4, 2 * side, 2 * side)
    context = [torch.randn(32, spec.text_dim), torch.randn(32, spec.text_dim)]
    times, exchange = [], []
    with torch.no_grad():
        model(x, torch.tensor([500.0, 500.0]), context)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(x, torch.tensor([500.0, 500.0]), context)
            times.append(time.perf_counter() - started)
            if sp is not None:  # the all-to-alls of one forward alone: 4 per block (q, k, v out, then back)
                q = torch.randn(2, 4 * side * side // sp.size, spec.num_heads, spec.head_dim)
                started = time.perf_counter()
                for _ in range(spec.num_layers):
                    heads = [sp._to_heads(q) for _ in range(3)]
                    sp._to_tokens(heads[0])
                exchange.append(time.perf_counter() - started)
    return {"tokens": 4 * side * side, "forward_s": statistics.median(times),
            "exchange_s": statistics.median(exchange) if exchange else 0.0}


def main() -> None:
    from wanlite.testing.ranks import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    one = forward_seconds(args.tokens, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        ranks = run_ranks(2, forward_seconds, args.tokens, args.repeats, folder=Path(folder), timeout_s=1800)
    if any(r[0] != "ok" for r in ranks):
        raise SystemExit(f"a rank failed: {ranks}")
    two = max((r[1] for r in ranks), key=lambda r: r["forward_s"])  # the slower rank sets the pace
    rows = [{"processes": 1, **one}, {"processes": 2, **two, "speedup": round(one["forward_s"] / two["forward_s"], 2),
                                      "exchange_share": round(two["exchange_s"] / two["forward_s"], 3)}]
    for row in rows:
        print(f"{row['processes']} process(es): {row['forward_s']:.2f} s/forward ({row['tokens']} tokens)"
              + (f", speedup {row['speedup']}x, all-to-alls {row['exchange_s']:.2f} s" if "speedup" in row else ""))
    write_json("parallel", {**header(), "model": "random DiT dim 1536, 12 heads, 4 blocks, CFG batch 2, fp32",
                                 "threads_per_process": 1, "rows": rows})


if __name__ == "__main__":
    main()
