"""Peak host RAM of a full-size T2V-A14B MoE run (two 14B experts) on this CPU machine, per `--ram_mode`.

Writes two synthetic random experts in ComfyUI's scaled-fp8 layout (2 x ~14.3 GB, streamed to disk one tensor
at a time), then, in a fresh subprocess per mode, opens them for block offload to the CPU and runs the MoE
schedule (high-noise forward(s), the switch, low-noise forward(s)) on a tiny latent with CFG batched. A psutil
thread samples RSS every 20 ms. The question answered: can a 16-32 GB PC run both experts without holding
either in RAM? (`pinned` would need both experts, 28.6 GB, in RAM: more than this 24 GB machine has.)

Writes bench/results/offload_host_ram.json: a list of {"mode", "peak_rss_gb", "weights_on_disk_gb",
"s_per_step", ...}.  Usage: python bench/offload_host_ram.py [--workdir DIR] [--steps 2] [--keep]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import machine, run_measured, write_json

TASK = "t2v-A14B"
ROLES = ("high_noise", "low_noise")

CHILD = r"""
from pathlib import Path
import torch
from wanlite.loading.checkpoints import with_components
from wanlite.loading.models import expert_components
from wanlite.offload import OffloadConfig, open_offloaded
work, mode, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ckpt = with_components(None, {f"{r}_model": work / f"wan2.2_t2v_{r}_14B_fp8_scaled.safetensors"
                              for r in ("high_noise", "low_noise")})
comps = expert_components(ckpt, "t2v-A14B")
t0 = time.perf_counter()
engine = open_offloaded(comps, "t2v-A14B", torch.bfloat16, None,
                        OffloadConfig("block", 0, 1, mode, cache_dir=work / "cache"), "cpu")
open_s = time.perf_counter() - t0
schedule = ["high_noise"] * (steps // 2) + ["low_noise"] * (steps - steps // 2)
engine.set_schedule(schedule)
torch.manual_seed(0)
x = torch.randn(2, 16, 1, 4, 4)  # CFG batch of 2, one latent frame of 4x4: 4 tokens
t = torch.full((2,), 900.0)
context = [torch.randn(16, 4096) * 0.1, torch.randn(16, 4096) * 0.1]
times = []
with torch.no_grad():
    for role in schedule:
        s = time.perf_counter()
        out = engine.activate(role)(x, t, context)
        times.append(time.perf_counter() - s)
        assert torch.isfinite(out).all()
tel = engine.finish()
stop_sampling()
print(json.dumps({"open_s": open_s, "s_per_step": sum(times) / len(times), "step_s": times,
                  "peak_rss": peak[0], "telemetry": tel.to_dict()}))
"""


def write_expert(path: Path, seed: int) -> int:
    """A full-size A14B expert as ComfyUI's fp8_scaled file: random e4m3fn block weights with a per-tensor
    scale, the rest bf16/fp32 as released, written tensor by tensor (never the whole model in RAM)."""
    import torch

    from wanlite.loading.writers import SafetensorsStreamWriter
    from wanlite.models.blocks import keeps_fp32
    from wanlite.models.dit import WanDiT
    from wanlite.quant.base import is_quantizable
    from wanlite.specs import DIT_SPECS, TASKS

    prefix = "model.diffusion_model."
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(DIT_SPECS[TASKS[TASK].dit]).state_dict().items()}
    plan = []
    for name, shape in shapes.items():
        if is_quantizable(name, shape):
            plan += [(prefix + name, torch.float8_e4m3fn, shape),
                     (prefix + name[: -len("weight")] + "scale_weight", torch.float32, ())]
        else:
            plan.append((prefix + name, torch.float32 if keeps_fp32(name) else torch.bfloat16, shape))
    plan.append((prefix + "scaled_fp8", torch.float8_e4m3fn, (0,)))
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsStreamWriter(path, plan, {"format": "pt"}) as out:
        for name, dtype, shape in plan:
            if dtype == torch.float8_e4m3fn and shape != (0,):
                # random finite e4m3 codes: magnitudes below 0x70 (|x| < 1.0 * 2^7), random sign
                codes = torch.randint(0, 0x70, shape, generator=gen, dtype=torch.uint8)
                codes |= (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)
                out.write(name, codes.view(torch.float8_e4m3fn))
            elif name.endswith("scale_weight"):
                out.write(name, torch.tensor(2e-4, dtype=torch.float32))
            elif shape == (0,):
                out.write(name, torch.empty(0, dtype=dtype))
            else:
                out.write(name, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=None, help="where the 2 x 14.3 GB experts go (default: a temp dir)")
    parser.add_argument("--modes", nargs="+", default=["mmap", "disk"])
    parser.add_argument("--steps", type=int, default=2, help="forwards; half on each expert (one switch)")
    parser.add_argument("--keep", action="store_true", help="keep the written experts and cache")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wanlite-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        files = {r: work / f"wan2.2_t2v_{r}_14B_fp8_scaled.safetensors" for r in ROLES}
        for seed, (role, path) in enumerate(files.items()):
            if not path.exists():
                print(f"writing {path} ...", flush=True)
                write_expert(path, seed)
        on_disk = sum(p.stat().st_size for p in files.values())
        for mode in args.modes:
            got = run_measured(CHILD, [work, mode, args.steps])
            cache = sum(p.stat().st_size for p in (work / "cache").rglob("*.bin")) if mode == "disk" else 0
            row = {"mode": mode, "peak_rss_gb": round(got["peak_rss"] / 1e9, 2),
                   "weights_on_disk_gb": round((on_disk + cache) / 1e9, 2),
                   "s_per_step": round(got["s_per_step"], 2), "step_s": [round(s, 2) for s in got["step_s"]],
                   "open_s": round(got["open_s"], 1), "telemetry": got["telemetry"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import psutil
    about = {"command": "python bench/offload_host_ram.py " + " ".join(sys.argv[1:]),
             "machine": {**machine(), "ram_gib": round(psutil.virtual_memory().total / 2**30)},
             "date": datetime.date.today().isoformat(),
             "setup": f"{TASK} full size, two synthetic fp8-scaled experts, {args.steps} forwards with one switch, "
                      "CFG batch 2, 4 tokens, block offload to CPU (k=0, d=1); target: mmap peak_rss_gb <= 16"}
    result = [{**row, **about} for row in rows]
    write_json("offload_host_ram", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
