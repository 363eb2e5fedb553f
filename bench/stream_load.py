"""Streamed loading against a raw read of the same file: seconds, MB/s, ratio and peak RSS per mode.

A synthetic DiT is written as one bf16 safetensors file (tensors in name order, as `save_file` writes them):
by default the full-size TI2V-5B (dim 3072, ffn 14336, 30 blocks, ~10 GB); `--small` writes the old 2 GB
7-block t2v shard in fp32. Modes, each in a fresh subprocess sampled for RSS (bench/harness.py), each after
one untimed read of the file (warm page cache):
- raw: a sequential read into one reused 16 MiB buffer (what the disk / page cache delivers);
- raw-to-ram: the same read into fresh memory kept until the end (the file materialized: page faults too);
- bf16: `prepare_dit` + `load` in bf16; fp8 / int8 / gguf-q8_0 / gguf-q4_k: the same, quantizing each block
  weight as it arrives. int8 is wanlite's plain per-row layout (`int8_from_hp`, what `convert --to int8`
  writes); int8-torchao is `--quant int8` (torchao's Int8WeightOnlyConfig).
Modes in SUBSET_MODES run on a file of `--subset-layers` blocks (labelled so), with its own raw read.
`stream_s` times the weights' read and quantization; `build_s` the meta-device build before it (imports).
Writes bench/results/stream_load.json.
Usage: python bench/stream_load.py [--workdir DIR] [--small] [--modes raw,bf16,...] [--subset-layers N]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from harness import run_measured, write_json

MODES = ("raw", "raw-to-ram", "bf16", "fp8", "int8", "gguf-q8_0", "gguf-q4_k", "int8-torchao")
SUBSET_MODES = ("gguf-q4_k", "int8-torchao")  # tens of MB/s: measured on a few blocks
SMALL_SPEC = dict(model_type="t2v", dim=2048, ffn_dim=8192, num_heads=16, num_layers=7, in_dim=16, out_dim=16)

CHILD = r"""
import os
import torch
path, mode, task = sys.argv[1], sys.argv[2], sys.argv[3]
size = os.path.getsize(path)
view = memoryview(bytearray(16 << 20))
with open(path, "rb", buffering=0) as f:  # warm the page cache, as a second run finds it
    while f.readinto(view):
        pass
load_before = os.getloadavg()
reset_peak()
out = {"build_s": 0.0, "model_bytes": size}
t0 = time.perf_counter()
if mode == "raw":
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
elif mode == "raw-to-ram":
    kept = []
    with open(path, "rb", buffering=0) as f:
        for start in range(0, size, 64 << 20):
            kept.append(torch.empty(min(64 << 20, size - start), dtype=torch.uint8))
            f.readinto(memoryview(kept[-1].numpy()))
else:
    from dataclasses import dataclass
    from wanlite.loading.checkpoints import component_from_file
    from wanlite.loading.models import prepare_dit
    from wanlite.loading.progress import reading
    from wanlite.models.blocks import keeps_fp32
    from wanlite.quant import QLinear, QuantConfig, parse_quant
    from wanlite.quant.base import on_fastest_device, register_quant
    from wanlite.quant.int8 import int8_from_hp

    @dataclass(frozen=True)
    class PlainInt8(QuantConfig):  # the int8 layout wanlite writes, quantized on load
        drops_input = True

    @register_quant(PlainInt8)
    def _plain_int8(linear, config):
        return QLinear(on_fastest_device(int8_from_hp, linear.weight.detach()),
                       None if linear.bias is None else linear.bias.detach())

    named = {"bf16": None, "int8": PlainInt8(), "int8-torchao": parse_quant("int8")}
    quant = named[mode] if mode in named else parse_quant(mode)
    prep = prepare_dit(component_from_file("dit", path), task)
    t1 = time.perf_counter()
    events = []
    with reading("dit", [path], events.append):
        model = prep.load(lambda n, _: torch.float32 if keeps_fp32(n) else torch.bfloat16, quant)
    out["build_s"] = t1 - t0
    t0 = t1
    out["model_bytes"] = sum(t.qdata.nbytes + t.scale.nbytes if hasattr(t, "qdata") else t.nbytes
                             for t in model.state_dict().values())  # torchao keeps its int8 in a subclass
    if "quantize_MBps" in events[-1]:
        out["quantize_MBps"] = round(events[-1]["quantize_MBps"], 1)
out["stream_s"] = time.perf_counter() - t0
stop_sampling()
out.update(baseline_rss=baseline, peak_rss=peak[0], loadavg_before=load_before, loadavg_after=os.getloadavg(),
           cpu_s=time.process_time())
print(json.dumps(out))
"""


def write_dit(path: Path, spec, dtype_name: str) -> int:
    """A random DiT of `spec`, written tensor by tensor (never all in RAM) in name order."""
    import torch

    from wanlite.models.dit import WanDiT

    dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[dtype_name]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in sorted(WanDiT(spec).state_dict().items())}
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = (torch.Size(shape).numel()) * dtype.itemsize
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write(torch.randn(shape, generator=gen).mul_(0.02).to(dtype).view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where to write the synthetic files (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="the old 2 GB fp32 7-block t2v shard instead")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--subset-layers", type=int, default=3, help="blocks in the file the slow modes load")
    args = parser.parse_args()
    modes = args.modes.split(",")
    from wanlite.specs import DIT_SPECS, DiTSpec

    spec, task, dtype = (DiTSpec(**SMALL_SPEC), "t2v-A14B", "F32") if args.small else \
        (DIT_SPECS["ti2v-5B"], "ti2v-5B", "BF16")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        files = {"full": (Path(tmp) / "dit.safetensors", spec)}
        if any(m in SUBSET_MODES for m in modes):
            files["subset"] = (Path(tmp) / "dit_subset.safetensors", replace(spec, num_layers=args.subset_layers))
        for which, (path, file_spec) in files.items():
            file_bytes = write_dit(path, file_spec, dtype)
            wanted = [m for m in modes if (m in SUBSET_MODES) == (which == "subset")]
            if which == "subset":
                wanted = ["raw", "raw-to-ram", "bf16"] + wanted
            runs = {}
            for mode in wanted:
                r = run_measured(CHILD, [path, mode, task], interval=0.01)
                r["MBps"] = round(file_bytes / r["stream_s"] / 1e6, 1)
                r["peak_over_baseline"] = r["peak_rss"] - r["baseline_rss"]
                r["peak_over_baseline_vs_model"] = round(r["peak_over_baseline"] / r["model_bytes"], 3)
                for ref in ("raw", "raw-to-ram"):
                    if ref in runs:
                        r[f"vs_{ref}"] = round(runs[ref]["stream_s"] / r["stream_s"], 3)
                runs[mode] = r
                print(f"{which:6s} {mode:13s} {r['stream_s']:7.2f} s (+{r['build_s']:.2f} s build) "
                      f"{r['MBps']:7.0f} MB/s  x{r.get('vs_raw', 1):.2f} raw  "
                      f"peak +{r['peak_over_baseline'] / 2**30:.2f} GiB for a {r['model_bytes'] / 2**30:.2f} GiB model"
                      f"  load {r['loadavg_before'][0]:.1f}"
                      + (f"  quantize {r['quantize_MBps']} MB/s" if "quantize_MBps" in r else ""), flush=True)
            results[which] = {"file_bytes": file_bytes, "layers": file_spec.num_layers, "runs": runs}
    write_json("stream_load", {
        "model": "synthetic " + ("t2v 7-block fp32 shard" if args.small else "TI2V-5B DiT, bf16, full size"),
        "model_spec": {k: v for k, v in vars(spec).items() if k in ("dim", "ffn_dim", "num_layers", "model_type")},
        "cpus_available": len(os.sched_getaffinity(0)),
        "notes": "stream_s: the weights' read (+ quantization), file bytes / stream_s = MBps, vs_raw = raw stream_s / "
                 "this stream_s (>= 0.8 asked for bf16, >= 0.5 for fp8/int8); build_s: the meta build before it. "
                 "loadavg: other processes on the machine's cores during the run; cpu_s: the child's CPU time, "
                 "imports and the warm-up read included. The subset file holds "
                 "--subset-layers blocks: its modes are compared with the raw read of that file.",
        **results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
