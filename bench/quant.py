"""What each weight format costs and loses: memory, error, speed and tiny-model quality.

Usage: python bench/quant.py [--sections memory,block,kquant,speed,quality] [--tokens 256] [--repeats 3]
Sections (all by default):
- memory:  bytes held per format for the full-size t2v-A14B expert and ti2v-5B (meta-device manifests, the same
           accounting as `wanlite info`), checked against the bytes a quantized full-size block really holds;
- block:   one full-size 14B DiT block (dim 5120, ffn 13824, 40 heads) with random heavy-tailed weights,
           quantized with `quantize_`; relative output error and SQNR vs the same block in bf16, on CPU;
- kquant:  reconstruction error of every GGUF type on one weight (wanlite's K-quant encoder vs the gguf-py
           legacy encoders), and the issue's bars: Q4_K <= Q4_0, Q5_K <= Q5_0, Q6_K <= 2 x Q8_0;
- speed:   dequant of a 5120x13824 weight, wanlite torch vs `gguf.quants.dequantize` (bit-exact first), and one
           linear of that shape per format vs bf16 on CPU;
- quality: the bundled tiny-t2v through `wanlite.eval.run_suite` per format vs the fp32 reference.
Writes bench/results/quant.json (sections not run keep their previous results).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gguf_dequant import best_of, measure
from wanlite.archs import manifest
from wanlite.models.blocks import BlockInputs, WanBlock
from wanlite.models.rope import rope_cos_sin
from wanlite.quant import QLinear, parse_quant, quantize_, sqnr, weight_bytes
from wanlite.quant.gguf_dequant import BLOCKS

RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"
DIM, FFN, HEADS = 5120, 13824, 40
BLOCK_FORMATS = ("fp8", "int8", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q4_k", "gguf-q5_0", "gguf-q4_0")
MEMORY_FORMATS = {"bf16": "bf16", "fp8": "fp8", "int8": "int8", "gguf-q8_0": "Q8_0", "gguf-q6_k": "Q6_K",
                  "gguf-q5_k": "Q5_K", "gguf-q4_k": "Q4_K", "gguf-q4_0": "Q4_0"}
QUALITY_FORMATS = ("fp8", "int8", "gguf-q8_0", "gguf-q4_k")


class OneBlock(nn.Module):
    """A single WanBlock named like the DiT's (`blocks.0.*`), so the shared high-precision rule applies."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([WanBlock(DIM, FFN, HEADS, 1e-6)])


def heavy_tailed_(block: nn.Module, seed: int = 0) -> None:
    """Student-t (4 dof) weights at Xavier scale: trained DiT weights have outliers that Gaussians lack, and
    outliers are what stretch a block's scale; no real 14B weights can be downloaded here."""
    torch.manual_seed(seed)
    dist = torch.distributions.StudentT(4.0)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Linear):
                fan = (module.in_features + module.out_features) / 2
                module.weight.copy_(dist.sample(module.weight.shape) / (2.0**0.5 * fan**0.5))  # t(4): variance 2
                module.bias.normal_(0, 0.02)


def held_bytes(model: nn.Module) -> int:
    """Bytes the quantized linears really keep (QLinear buffers, backends' packed tensors) plus the rest."""
    total = 0
    for module in model.modules():
        if isinstance(module, QLinear):
            total += module.weight.nbytes + (0 if module.bias is None else module.bias.nbytes)
            continue
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            inner = [getattr(p, a) for a in ("qdata", "scale", "int_data", "_data", "CB", "SCB") if
                     isinstance(getattr(p, a, None), torch.Tensor)]
            total += sum(t.nbytes for t in inner) if inner else p.numel() * p.element_size()
    return total


def section_memory() -> dict:
    rows = {}
    for arch in ("t2v-A14B", "ti2v-5B"):
        shapes = manifest(arch)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        rows[arch] = {"parameters": params, "bytes": {}, "bytes_per_param": {}}
        for label, fmt in MEMORY_FORMATS.items():
            n = weight_bytes(shapes, fmt)
            rows[arch]["bytes"][label] = n
            rows[arch]["bytes_per_param"][label] = round(n / params, 3)
            print(f"{arch:9s} {label:10s} {n / 1e9:6.2f} GB  {n / params:.3f} B/param")
    return {"note": "one A14B expert (the task holds two); same accounting as `wanlite info --arch`", "models": rows}


def block_inputs(tokens: int, seed: int = 1) -> tuple[torch.Tensor, BlockInputs]:
    gen = torch.Generator().manual_seed(seed)
    frames = 4
    grid = (frames, 8, tokens // (8 * frames))
    x = torch.randn(1, tokens, DIM, generator=gen)
    e0 = torch.randn(1, frames, 6, DIM, generator=gen) * 0.1
    context = torch.randn(1, 64, DIM, generator=gen)
    return x, BlockInputs(e0=e0, context=context, rope=rope_cos_sin(grid, DIM // HEADS))


def section_block(tokens: int) -> dict:
    torch.manual_seed(0)
    ref = OneBlock()
    heavy_tailed_(ref)
    ref = ref.to(torch.bfloat16)
    x, inputs = block_inputs(tokens)
    x = x.to(torch.bfloat16)
    inputs.context = inputs.context.to(torch.bfloat16)  # the DiT embeds text in its compute dtype
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    with torch.no_grad():
        want = ref.blocks[0](x, inputs).float()
    rows = []
    for name in BLOCK_FORMATS:
        config = parse_quant(name)
        model = copy.deepcopy(ref)
        started = time.perf_counter()
        quantize_(model, config)
        quant_s = time.perf_counter() - started
        with torch.no_grad():
            got = model.blocks[0](x, inputs).float()
        rel = float((got - want).norm() / want.norm())
        fmt = MEMORY_FORMATS.get(name)
        row = {"format": name, "relative_output_error": round(rel, 5), "sqnr_db": round(sqnr(want, got), 2),
               "quantize_seconds": round(quant_s, 1), "held_bytes": held_bytes(model),
               "manifest_bytes": weight_bytes(shapes, fmt) if fmt else None}
        rows.append(row)
        accounting = "" if fmt is None else f" (accounting {row['manifest_bytes'] / 1e6:.1f} MB)"
        print(f"block {name:10s} rel err {rel:.5f}  SQNR {row['sqnr_db']:6.2f} dB  held "
              f"{row['held_bytes'] / 1e6:7.1f} MB{accounting}  quantize {quant_s:.1f} s", flush=True)
        del model
    return {"block": {"dim": DIM, "ffn_dim": FFN, "num_heads": HEADS, "tokens": tokens, "context_rows": 64,
                      "weights": "Student-t(4) at Xavier scale, seed 0", "reference": "the same block in bf16",
                      "bf16_bytes": held_bytes(ref)},
            "results": rows}


def section_kquant(rows: int = 512, cols: int = 4096) -> dict:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    from wanlite.quant.gguf_quantize import quantize

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    errors = {}
    for qtype in ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"):
        started = time.perf_counter()
        raw = quantize(weight, qtype)
        seconds = time.perf_counter() - started
        back = torch.from_numpy(reference(raw.numpy(), GGMLQuantizationType[qtype])).reshape(rows, cols)
        rel = float((back - weight).pow(2).mean().sqrt() / weight.pow(2).mean().sqrt())
        errors[qtype] = {"relative_rmse": round(rel, 5), "bits_per_weight": round(BLOCKS[qtype][1] * 8 / BLOCKS[qtype][0], 3),
                         "encode_mweights_per_s": round(rows * cols / seconds / 1e6, 1),
                         "encoder": "wanlite" if qtype.endswith("_K") else "gguf-py"}
        print(f"{qtype:5s} rel RMSE {rel:.5f}  encode {errors[qtype]['encode_mweights_per_s']:6.1f} Mw/s", flush=True)
    e = {q: v["relative_rmse"] for q, v in errors.items()}
    bars = {"Q4_K <= Q4_0": e["Q4_K"] <= e["Q4_0"], "Q5_K <= Q5_0": e["Q5_K"] <= e["Q5_0"],
            "Q6_K <= 2 x Q8_0": e["Q6_K"] <= 2 * e["Q8_0"]}
    return {"weight": f"N(0, 0.02^2) [{rows}, {cols}], decoded by gguf.quants.dequantize", "types": errors,
            "bars": bars,
            "note": "Q6_K stores 6.56 bits vs Q8_0's 8.5: a 6-bit grid step is ~4x an 8-bit one, so ~3x the error "
                    "of Q8_0 is what the format allows; the 2x bar is out of reach for any Q6_K encoder"}


def section_speed(repeats: int, tokens: int) -> dict:
    shape = (DIM, FFN)
    dequant = [measure(q, shape, repeats) for q in ("Q8_0", "Q4_K")]
    for r in dequant:
        print(f"dequant {r['type']:5s} exact={r['bit_exact']} {r['dequant_speedup_vs_gguf_py']:.2f}x gguf-py", flush=True)
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(FFN, DIM).to(torch.bfloat16)  # the FFN down projection: weight [5120, 13824]
    with torch.no_grad():
        linear.weight.copy_(torch.randn(DIM, FFN, generator=gen) * FFN**-0.5)
    x = torch.randn(tokens, FFN, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        want = linear(x).float()
        base_s = best_of(lambda: linear(x), repeats)
    rows = [{"format": "bf16", "seconds": round(base_s, 4), "vs_bf16": 1.0}]
    for name in ("fp8", "int8", "gguf-q8_0", "gguf-q4_k"):
        for backend in (("torchao", "bnb", "quanto") if name == "int8" else ("torchao",)):
            label = f"int8-{backend}" if name == "int8" else name
            try:
                holder = quantize_(nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict(
                    {"ffn": nn.Sequential(nn.Identity(), nn.Identity(), copy.deepcopy(linear))})])}),
                    parse_quant(name, backend))
                layer = holder["blocks"][0]["ffn"][2]
                with torch.no_grad():
                    got = layer(x).float()
                    seconds = best_of(lambda: layer(x), repeats)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is a result, not a crash
                rows.append({"format": label, "unavailable": str(exc).splitlines()[0][:200]})
                print(f"linear {label:14s} unavailable: {rows[-1]['unavailable']}")
                continue
            rows.append({"format": label, "seconds": round(seconds, 4), "vs_bf16": round(seconds / base_s, 2),
                         "sqnr_db": round(sqnr(want, got), 2)})
            print(f"linear {label:14s} {seconds * 1e3:8.1f} ms  {rows[-1]['vs_bf16']:.2f}x bf16  "
                  f"SQNR {rows[-1]['sqnr_db']} dB", flush=True)
    return {"dequant": {"shape": list(shape), "results": dequant},
            "linear": {"weight_shape": [DIM, FFN], "tokens": tokens, "activations": "bf16",
                       "note": "CPU: every weight-only format dequantizes then runs a bf16 GEMM; the win is memory",
                       "results": rows}}


def section_quality(seeds: int) -> dict:
    from wanlite.eval import DEFAULT_PROMPTS, run_suite, summarize

    variants = {"fp32": {}} | {name: {"quant": name} for name in QUALITY_FORMATS}
    results = run_suite(variants, prompts=DEFAULT_PROMPTS, seeds=tuple(range(seeds)), reference="fp32")
    rows = summarize(results)
    for r in rows:
        print(f"tiny-t2v {r['variant']:10s} direction {r['direction_accuracy']:.3f}  "
              f"PSNR {r['psnr_vs_reference'] or float('nan'):6.2f}  SSIM {r['ssim_vs_reference'] or float('nan'):.4f}")
    return {"task": "tiny-t2v", "note": "the tiny DiT's rows are 128/256 wide: Q4_K needs 256, so the 128-wide "
                                        "rows fall back to Q5_0 as llama.cpp's converter does", "summary": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="memory,block,kquant,speed,quality")
    parser.add_argument("--tokens", type=int, default=256, help="video tokens fed to the block / linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt in the quality section")
    args = parser.parse_args()
    chosen = args.sections.split(",")
    runners = {"memory": section_memory, "block": lambda: section_block(args.tokens), "kquant": section_kquant,
               "speed": lambda: section_speed(args.repeats, args.tokens), "quality": lambda: section_quality(args.seeds)}
    unknown = [s for s in chosen if s not in runners]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; choose from {', '.join(runners)}", file=sys.stderr)
        return 2
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sections": {}}
    for name in chosen:
        started = time.perf_counter()
        section = runners[name]()
        section.update({
            "command": "python bench/quant.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "seconds": round(time.perf_counter() - started, 1)})
        result["sections"][name] = section
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(RESULTS)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
