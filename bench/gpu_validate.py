"""One command that checks the GPU path on one GPU, with synthetic full-size models (no downloads).

Sections, each row saying what it ran:
- plans: one full-size T2V-A14B expert (random weights, fp8 blocks) under the planner's 8 GB and 12 GB plans
  at 480p and 720p, run with the plan's placement (resident blocks, prefetch, token chunks, per-block CFG) under a
  `torch.cuda.set_per_process_memory_fraction` cap of the card's size: measured peak VRAM of the transformer
  stage against the plan's prediction, and s/step;
- offload: the 12 GB plan's s/step at 480p over the same expert all-resident (goal: <= 1.03);
- switch: two experts on schedule A, A, B, B under the 12 GB plan: the stall at the switch over one block's
  compute;
- ti2v: TI2V-5B at 720p under the 8 GB plan: one step, then the full-size Wan2.2 VAE decoding in the plan's tiles
  (peak of each stage against the prediction);
- fp8: a [tokens, 5120] x [5120, 13824] GEMM with fp8 weights through `_scaled_mm` (sm >= 8.9) and upcast to
  bf16: time and SNR against bf16 with the dequantized weights;
- gguf: GGUF dequantization on the device, GB of weights decoded per second per type.
Frames are cut where one step would not fit the time (`--frames`, `--ti2v-frames`); predictions are made for the
workload that ran. `--dry-run` runs the same code on the CPU at tiny sizes with the offload engine driven by the
stream emulator (wanlite.testing.stream_emulator), so the script cannot rot without a GPU.
Writes bench/results/gpu_validate.json (a dry run: gpu_validate_dry_run.json).
Usage: python bench/gpu_validate.py [--frames 81] [--ti2v-frames 41] [--steps 2] [--dry-run] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import header, write_json

SIZES = {"480p": (832, 480), "720p": (1280, 720)}
TI2V_720P = (1280, 704)
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0")


class Bench:
    """Where the models run: the GPU, or (dry run) the CPU at tiny sizes through the stream emulator."""

    def __init__(self, dry: bool):
        from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.a14b = replace(TINY_DIT_SPECS["t2v-A14B"], num_layers=6) if dry else DIT_SPECS["t2v-A14B"]
        self.ti2v = replace(TINY_DIT_SPECS["ti2v-5B"], num_layers=6) if dry else DIT_SPECS["ti2v-5B"]
        self.seed = 0

    def streams(self):
        if not self.dry:
            return None
        from wanlite.testing.stream_emulator import StreamEmulator

        self.seed += 1
        return StreamEmulator(self.seed)

    def cap(self, gb: float | None) -> None:
        if self.dry:
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total) if gb else 1.0, self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize(self.device)

    def peak_gb(self) -> float:
        return 0.0 if self.dry else round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)

    def latent(self, spec, vae: str, width: int, height: int, frames: int) -> tuple[int, int, int]:
        from wanlite.specs import VAE_SPECS

        if self.dry:
            return 3, 8, 8
        vt, vs, _ = VAE_SPECS[vae].stride
        return (frames - 1) // vt + 1, height // vs, width // vs


def random_expert(spec, seed: int, fp8: bool = True):
    """A WanDiT with random weights, built part by part on the host so RAM peaks near the stored size."""
    from wanlite.models.dit import WanDiT
    from wanlite.quant import Fp8WeightConfig, quantize_

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanDiT(spec)
    for name, child in list(model.named_children()):
        for part in (child if name == "blocks" else [child]):
            part.to_empty(device="cpu")
            with torch.no_grad():
                for p in part.parameters():
                    p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
            part.to(torch.bfloat16)
            if name == "blocks" and fp8:
                quantize_(part, Fp8WeightConfig(), filter_fn=lambda n, m: isinstance(m, torch.nn.Linear))
    return model.eval().requires_grad_(False)


def dit_inputs(bench: Bench, spec, latent: tuple[int, int, int]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.in_dim, *latent, generator=g).to(bench.device)
    t = torch.full((2,), 900.0, device=bench.device)
    context = [(torch.randn(64, spec.text_dim, generator=g) * 0.1).to(bench.device) for _ in range(2)]
    return x, t, context


def run_placed(bench: Bench, experts: dict, plan, schedule: list[str], inputs, cap_gb: float | None) -> dict:
    """The experts placed as `plan` says (None: all resident), run over `schedule`: s/step (after the first
    forward, which pays the initial copies), peak VRAM, the engine's telemetry."""
    from wanlite.offload import OffloadConfig, attach_offload

    bench.cap(cap_gb)
    engine = None
    if plan is None or plan.offload == "none":
        models = {r: m.to(bench.device) for r, m in experts.items()}
        call = models.__getitem__
    else:
        resident = plan.resident_blocks if plan.offload == "block" else len(next(iter(experts.values())).blocks)
        engine = attach_offload(experts, OffloadConfig("block", resident, plan.prefetch), bench.device,
                                copy_on_host=True, streams=bench.streams())
        engine.set_schedule(schedule)
        call = engine.activate
    for model in experts.values():
        model.chunk_tokens = (plan.chunk_tokens or None) if plan is not None else None
        model.rows_apart = plan is not None and plan.cfg == "per_block"
    times = []
    with torch.no_grad():
        for role in schedule:
            bench.sync()
            started = time.perf_counter()
            call(role)(*inputs)
            bench.sync()
            times.append(time.perf_counter() - started)
    peak = bench.peak_gb()
    telemetry = engine.finish().to_dict() if engine is not None else None
    if engine is None:
        for model in experts.values():
            model.to("cpu")
    steady = times[1:] or times
    return {"s_per_step": round(sum(steady) / len(steady), 3), "step_s": [round(v, 3) for v in times],
            "peak_vram_gb": peak, "telemetry": telemetry}


def a14b_plan(vram: float, width: int, height: int, frames: int, steps: int):
    from wanlite.planner import Workload, hypothetical, make_plan

    return make_plan(Workload("t2v-A14B", width, height, frames, steps), hypothetical(vram, 32), quant="fp8")


def transformer_stage_gb(plan) -> float:
    p = plan.predicted
    return round(p.vram_weights_gb + p.vram_activations_gb + p.vram_buffers_gb, 2)


def section_plans(bench: Bench, expert, frames: int, steps: int) -> list[dict]:
    rows = []
    for size, (width, height) in SIZES.items():
        inputs = dit_inputs(bench, bench.a14b, bench.latent(bench.a14b, "vae2.1", width, height, frames))
        for vram in (8, 12):
            plan = a14b_plan(vram, width, height, frames, steps)
            got = run_placed(bench, {"high_noise": expert}, plan, ["high_noise"] * steps, inputs, vram)
            predicted = transformer_stage_gb(plan)
            rows.append({"ran": f"t2v-A14B expert, fp8, {width}x{height}x{frames}, CFG 2, {vram} GB plan under a "
                                f"{vram} GB cap", "plan": {k: plan.to_dict()[k] for k in (
                                    "offload", "resident_blocks", "prefetch", "chunk_tokens", "cfg")},
                         "predicted_transformer_gb": predicted, **got,
                         "predicted_over_measured": round(predicted / got["peak_vram_gb"], 3) if got["peak_vram_gb"]
                         else None})
            print(rows[-1], flush=True)
    return rows


def section_offload_and_switch(bench: Bench, experts: dict, frames: int, steps: int, plans_rows: list) -> list:
    width, height = SIZES["480p"]
    inputs = dit_inputs(bench, bench.a14b, bench.latent(bench.a14b, "vae2.1", width, height, frames))
    whole = run_placed(bench, {"high_noise": experts["high_noise"]}, None, ["high_noise"] * steps, inputs, None)
    planned = next(r for r in plans_rows if "832x480" in r["ran"] and "12 GB plan" in r["ran"])
    rows = [{"ran": f"t2v-A14B expert all resident, fp8, {width}x{height}x{frames}, CFG 2", **whole},
            {"ran": "12 GB plan over all resident (480p)", "s_per_step_planned": planned["s_per_step"],
             "s_per_step_all_resident": whole["s_per_step"],
             "over_all_resident": round(planned["s_per_step"] / whole["s_per_step"], 3), "goal": "<= 1.03"}]
    plan = a14b_plan(12, width, height, frames, steps)
    switch = run_placed(bench, experts, plan, ["high_noise", "high_noise", "low_noise", "low_noise"], inputs, 12)
    block_s = whole["s_per_step"] / bench.a14b.num_layers
    stall = switch["telemetry"]["switch_stall_s"]
    rows.append({"ran": "expert switch, two experts A A B B under the 12 GB plan (480p)", **switch,
                 "switch_stall_s": stall, "one_block_compute_s": round(block_s, 4),
                 "stall_over_one_block": round(stall / block_s, 3) if block_s else None})
    for row in rows:
        print(row, flush=True)
    return rows


def section_ti2v(bench: Bench, frames: int) -> dict:
    from wanlite.models.vae import Tiling, WanVAE
    from wanlite.planner import Workload, hypothetical, make_plan
    from wanlite.specs import TINY_VAE_SPECS, VAE_SPECS

    width, height = TI2V_720P
    plan = make_plan(Workload("ti2v-5B", width, height, frames, 1), hypothetical(8, 32))
    model = random_expert(bench.ti2v, 2, fp8=plan.weight_format == "fp8")
    latent = bench.latent(bench.ti2v, "vae2.2", width, height, frames)
    step = run_placed(bench, {"main": model}, plan, ["main"], dit_inputs(bench, bench.ti2v, latent), 8)
    del model
    torch.manual_seed(3)
    spec = (TINY_VAE_SPECS if bench.dry else VAE_SPECS)["vae2.2"]
    vae = WanVAE(spec).eval().requires_grad_(False).to(bench.device)
    z = torch.randn(1, spec.z_dim, *latent, device=bench.device)
    bench.cap(8)
    started = time.perf_counter()
    with torch.no_grad():
        tile = plan.vae_tile or None
        video = vae.decode_tiled(z, Tiling(tile, max(1, tile * 3 // 8))) if tile else vae.decode(z)
    bench.sync()
    decode = {"decode_s": round(time.perf_counter() - started, 2), "peak_vram_gb": bench.peak_gb(),
              "frames_out": video.shape[2], "vae_tile": plan.vae_tile,
              "predicted_vae_gb": plan.predicted.vram_vae_gb}
    row = {"ran": f"ti2v-5B, {plan.weight_format}, {width}x{height}x{frames}, 8 GB plan under an 8 GB cap: one step, "
                  f"then the Wan2.2 VAE decode", "plan": {k: plan.to_dict()[k] for k in (
                      "offload", "resident_blocks", "prefetch", "chunk_tokens", "cfg", "vae_tile")},
           "step": step, "predicted_transformer_gb": transformer_stage_gb(plan), "decode": decode}
    print(row, flush=True)
    return row


def snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = (ref.float() - got.float()).pow(2).sum()
    return round(float(10 * torch.log10(ref.float().pow(2).sum() / err)), 2) if err > 0 else float("inf")


def timed(bench: Bench, fn, repeats: int = 5) -> float:
    fn()
    bench.sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    bench.sync()
    return (time.perf_counter() - started) / repeats


def section_fp8(bench: Bench) -> dict:
    from wanlite.quant.fp8 import fp8_from_hp, scaled_mm_linear, scaled_mm_supported

    tokens, d, f = (64, 256, 512) if bench.dry else (8192, 5120, 13824)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, d, generator=g).to(bench.device, torch.bfloat16)
    w = fp8_from_hp(torch.randn(f, d, generator=g) * 0.02)
    qdata, scale = w.qdata.to(bench.device), w.scale.to(bench.device)
    dense = (qdata.float() * scale.reshape(-1, 1)).to(torch.bfloat16)
    ref = (x.float() @ dense.float().t())
    upcast = lambda: torch.nn.functional.linear(x, qdata.to(torch.bfloat16) * scale.to(torch.bfloat16).reshape(-1, 1))  # noqa: E731
    row = {"ran": f"[{tokens}, {d}] x [{d}, {f}] GEMM, fp8 e4m3 weights with per-row scales",
           "upcast_bf16_ms": round(timed(bench, upcast) * 1e3, 3), "upcast_snr_db": snr_db(ref, upcast())}
    if scaled_mm_supported(bench.device):
        scaled = lambda: scaled_mm_linear(x, qdata, scale, None)  # noqa: E731
        row.update(scaled_mm_ms=round(timed(bench, scaled) * 1e3, 3), scaled_mm_snr_db=snr_db(ref, scaled()),
                   scaled_mm_speedup=round(row["upcast_bf16_ms"] / (timed(bench, scaled) * 1e3), 2))
    else:
        row["scaled_mm"] = "not available here (needs CUDA compute capability 8.9+)"
    print(row, flush=True)
    return row


def section_gguf(bench: Bench) -> list[dict]:
    from wanlite.quant.gguf_dequant import BLOCKS, dequantize
    from wanlite.testing.gguf_blocks import random_blocks

    rows_, cols = (256, 512) if bench.dry else (5120, 13824)
    rows = []
    for qtype in GGUF_TYPES:
        per_block = BLOCKS[qtype][0]
        raw = torch.from_numpy(random_blocks(qtype, rows_ * cols // per_block).reshape(-1)).to(bench.device)
        seconds = timed(bench, lambda: dequantize(raw, qtype, (rows_, cols), dtype=torch.bfloat16))
        rows.append({"ran": f"{qtype} [{rows_}, {cols}] -> bf16 on {bench.device.type}", "ms": round(seconds * 1e3, 3),
                     "gguf_gb_per_s": round(raw.numel() / seconds / 1e9, 2),
                     "bf16_out_gb_per_s": round(2 * rows_ * cols / seconds / 1e9, 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81, help="T2V-A14B frames (4k+1)")
    parser.add_argument("--ti2v-frames", type=int, default=41, help="TI2V-5B frames (4k+1)")
    parser.add_argument("--steps", type=int, default=2, help="forwards per configuration (the first is warm-up)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU through the stream emulator")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/gpu_validate*.json)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here; --dry-run checks the script on the CPU", file=sys.stderr)
        return 2
    bench = Bench(args.dry_run)
    started = time.perf_counter()
    experts = {"high_noise": random_expert(bench.a14b, 0), "low_noise": random_expert(bench.a14b, 1)}
    result = {**header(), "device": "CPU, dry run (tiny sizes, stream emulator)" if bench.dry else
              torch.cuda.get_device_name(bench.device), "weights": "random (official shapes), fp8 blocks"}
    result["plans"] = section_plans(bench, experts["high_noise"], args.frames, args.steps)
    result["offload"] = section_offload_and_switch(bench, experts, args.frames, args.steps, result["plans"])
    del experts
    result["ti2v"] = section_ti2v(bench, args.ti2v_frames)
    result["fp8"] = section_fp8(bench)
    result["gguf"] = section_gguf(bench)
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = "gpu_validate_dry_run" if bench.dry else "gpu_validate"
    if args.out:
        out = Path(args.out)
        write_json(out.stem, result, out.parent)
    else:
        write_json(name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
