"""What block offload's machinery costs on the CPU: experts with offload attached (CPU->CPU) vs the same experts
without it. Rows: the bundled tiny-t2v on the demo's latent (17 frames at 64x64) as a CPU user runs it (RAM
slabs used in place: only the engine's bookkeeping); the same with the copies a GPU would make forced through
the ring buffers (memcpy on a CPU, an async DMA on a GPU); and a mid-size random DiT (dim 1536, 6 blocks, the
scale of Wan's 1.3B) with forced copies, where a block's compute is no longer microseconds.

A run is a denoising schedule (20 forwards, CFG batch 2, one expert switch); runs alternate plain / offloaded so
drift hits both; the median of the per-pair ratios is reported (goal <= 1.05), with the copy time and the
remaining per-block bookkeeping. Writes bench/results/offload_overhead.json.
Usage: python bench/offload_overhead.py [--repeats 40]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
from harness import machine, write_json


def tiny_experts():
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit
    from wanlite.tiny import checkpoint_dir

    comps = expert_components(discover(checkpoint_dir("tiny-t2v")), "tiny-t2v")
    return lambda: {r: load_dit(c, "tiny-t2v", torch.float32) for r, c in comps.items()}, (5, 8, 8)


def mid_experts():
    from wanlite.models.dit import WanDiT
    from wanlite.specs import DIT_SPECS

    spec = replace(DIT_SPECS["t2v-A14B"], dim=1536, ffn_dim=8960, num_heads=12, num_layers=6)

    def build():
        torch.manual_seed(0)
        return {r: WanDiT(spec).eval().requires_grad_(False) for r in ("high_noise", "low_noise")}

    return build, (3, 16, 16)


def measure(build, latent, steps: int, repeats: int, copy_on_host: bool) -> dict:
    from wanlite.offload import OffloadConfig, attach_offload

    plain, offloaded = build(), build()
    spec = plain["high_noise"].spec
    torch.manual_seed(0)
    x = torch.randn(2, spec.in_dim, *latent)
    t = torch.full((2,), 900.0)
    context = [torch.randn(12, spec.text_dim), torch.randn(12, spec.text_dim)]
    schedule = ["high_noise"] * (steps // 2) + ["low_noise"] * (steps - steps // 2)
    times = {"plain": [], "offload": [], "copy": []}
    ratios = []
    engine = attach_offload(offloaded, OffloadConfig("block", resident_blocks=0, prefetch=1), "cpu",
                            copy_on_host=copy_on_host)
    with torch.no_grad():
        for i in range(repeats + 1):  # the first round warms up
            s = time.perf_counter()
            want = [plain[role](x, t, context) for role in schedule]
            plain_s = time.perf_counter() - s
            engine.set_schedule(schedule)
            copy_before = engine.telemetry.copy_wait_s
            s = time.perf_counter()
            got = [engine.activate(role)(x, t, context) for role in schedule]
            offload_s = time.perf_counter() - s
            if not all(torch.equal(a, b) for a, b in zip(want, got)):
                raise SystemExit("offloaded output differs from the plain one")
            if i:
                times["plain"].append(plain_s / len(schedule))
                times["offload"].append(offload_s / len(schedule))
                times["copy"].append((engine.telemetry.copy_wait_s - copy_before) / len(schedule))
                ratios.append(offload_s / plain_s)
    moved = engine.finish().bytes_moved // (repeats + 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"plain_s_per_forward": round(med["plain"], 5), "offload_s_per_forward": round(med["offload"], 5),
            "copy_s_per_forward": round(med["copy"], 6),
            "bookkeeping_us_per_block": round(1e6 * (med["offload"] - med["plain"] - med["copy"]) / spec.num_layers, 1),
            "ratio": round(statistics.median(ratios), 4),
            "ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
            "bytes_moved_per_run": moved, "outputs_equal": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20, help="tiny: forwards per run (the demo's 20 steps)")
    parser.add_argument("--mid-repeats", dest="mid_repeats", type=int, default=6,
                        help="mid-size runs (4 forwards each, ~2 s per forward on 2 cores)")
    args = parser.parse_args()
    rows = []
    configs = (("tiny-t2v (bundled, dim 128, 3 blocks)", tiny_experts(), args.steps, args.repeats, False),
               ("tiny-t2v, copies forced", tiny_experts(), args.steps, args.repeats, True),
               ("mid (random, dim 1536, 6 blocks), copies forced", mid_experts(), 4, args.mid_repeats, True))
    for name, (build, latent), steps, repeats, copies in configs:
        row = {"config": name, "latent": list(latent), "forwards_per_run": steps, "copy_on_host": copies,
               **measure(build, latent, steps, repeats, copies)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"command": "python bench/offload_overhead.py " + " ".join(sys.argv[1:]),
              "machine": machine(),
              "date": datetime.date.today().isoformat(),
              "setup": "one expert switch per run, CFG batch 2, fp32; block offload "
                       "CPU->CPU k=0 d=1 (every block through the ring) vs no offload; runs alternate",
              "goal": "ratio <= 1.05", "rows": rows}
    write_json("offload_overhead", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
