"""Block offload on a GPU: a full-size A14B expert (random weights, fp8) at 832x480x81 (32,760 tokens, CFG
batch 2) under `torch.cuda.set_per_process_memory_fraction` caps of 8, 12 and 24 GB, against the same expert
all-resident. Reports per cap: the resident blocks chosen, peak VRAM, s/step, s/step / all-resident s/step
(goal <= 1.03), bytes moved and transfer waits; plus the stall at an expert switch (two experts, schedule
A, A, B, B).

The number of resident blocks per cap comes from a k=0 run's measured peak: k = (cap - peak(k=0) - margin) /
block bytes. `--dry-run` runs the same code on the CPU with a tiny config (no GPU needed; CI-free check).
Writes bench/results/gpu_offload.json (or gpu_offload_dry_run.json).
Usage: python bench/gpu_offload.py [--caps 8 12 24] [--steps 3] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def random_expert(spec, seed: int, fmt: str):
    """A WanDiT with random weights, built block by block on the host so RAM peaks near the fp8 size."""
    from wanlite.models.dit import WanDiT
    from wanlite.quant import Fp8WeightConfig, quantize_

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanDiT(spec)
    for name, child in list(model.named_children()):
        parts = child if name == "blocks" else [child]
        for part in parts:
            part.to_empty(device="cpu")
            with torch.no_grad():
                for p in part.parameters():
                    p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
            part.to(torch.bfloat16)
            if name == "blocks" and fmt == "fp8":
                quantize_(part, Fp8WeightConfig(), filter_fn=lambda n, m: isinstance(m, torch.nn.Linear))
    return model.eval().requires_grad_(False)


def block_bytes(model) -> int:
    return sum(t.nbytes for t in model.blocks[0].state_dict().values())


def run(experts: dict, device, schedule, inputs, resident: int | None, prefetch: int, cap_gb: float | None):
    """s/step, peak device bytes and telemetry for one configuration (resident=None: no offload)."""
    from wanlite.offload import OffloadConfig, attach_offload

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total) if cap_gb else 1.0, device)
        torch.cuda.reset_peak_memory_stats(device)
    x, t, context = inputs
    times, telemetry = [], None
    if resident is None:
        models = {r: m.to(device) for r, m in experts.items()}
        call = models.__getitem__
    else:
        engine = attach_offload(experts, OffloadConfig("block", resident, prefetch), device, copy_on_host=True)
        engine.set_schedule(schedule)
        call = engine.activate
    with torch.no_grad():
        for role in schedule:
            if cuda:
                torch.cuda.synchronize(device)
            s = time.perf_counter()
            call(role)(x, t, context)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - s)
    if resident is None:
        for m in experts.values():
            m.to("cpu")
    else:
        telemetry = engine.finish().to_dict()
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    steady = times[1:] if len(times) > 1 else times  # the first forward pays the initial loads
    return {"s_per_step": sum(steady) / len(steady), "step_s": [round(v, 3) for v in times],
            "peak_vram_gb": round(peak / 1e9, 2), "telemetry": telemetry}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--caps", type=float, nargs="+", default=[8, 12, 24], help="VRAM caps in GB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (no GPU needed)")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/gpu_offload*.json)")
    args = parser.parse_args()

    from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS

    if args.dry_run:
        device, spec, fmt = torch.device("cpu"), replace(TINY_DIT_SPECS["t2v-A14B"], num_layers=6), "fp8"
        latent = (16, 5, 8, 8)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
        device, spec, fmt = torch.device("cuda"), DIT_SPECS["t2v-A14B"], "fp8"
        latent = (16, 21, 60, 104)  # 832x480, 81 frames
    experts = {"high_noise": random_expert(spec, 0, fmt), "low_noise": random_expert(spec, 1, fmt)}
    torch.manual_seed(0)
    x = torch.randn(2, *latent, device=device)
    t = torch.full((2,), 900.0, device=device)
    context = [torch.randn(64, spec.text_dim, device=device) * 0.1 for _ in range(2)]
    inputs = (x, t, context)
    one = ["high_noise"] * args.steps

    rows = []
    reference = run({"high_noise": experts["high_noise"]}, device, one, inputs, None, 0, None)
    rows.append({"config": "all resident", **reference})
    print(json.dumps(rows[-1]), flush=True)
    bytes_per_block = block_bytes(experts["high_noise"])
    for cap in args.caps:
        probe = run({"high_noise": experts["high_noise"]}, device, one[:2], inputs, 0, args.prefetch, cap)
        spare = cap * 1e9 * 0.92 - probe["peak_vram_gb"] * 1e9
        resident = max(0, min(spec.num_layers, int(spare // bytes_per_block))) if device.type == "cuda" else 2
        got = run({"high_noise": experts["high_noise"]}, device, one, inputs, resident, args.prefetch, cap)
        row = {"config": f"cap {cap:g} GB", "cap_gb": cap, "resident_blocks": resident, "prefetch": args.prefetch,
               **got, "over_all_resident": round(got["s_per_step"] / reference["s_per_step"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    switch = run(experts, device, ["high_noise", "high_noise", "low_noise", "low_noise"], inputs, 0,
                 args.prefetch, max(args.caps))
    rows.append({"config": "expert switch (k=0)", **switch,
                 "switch_stall_s": switch["telemetry"]["switch_stall_s"]})
    print(json.dumps(rows[-1]), flush=True)

    name = "gpu_offload_dry_run.json" if args.dry_run else "gpu_offload.json"
    result = {"command": "python bench/gpu_offload.py " + " ".join(sys.argv[1:]),
              "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                          f"{platform.machine()} CPU (dry run)"),
              "date": datetime.date.today().isoformat(),
              "setup": f"{'tiny' if args.dry_run else 'full-size'} t2v-A14B expert(s), {fmt} block weights, latent "
                       f"{latent}, CFG batch 2, prefetch {args.prefetch}",
              "goal": "over_all_resident <= 1.03", "rows": rows}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
