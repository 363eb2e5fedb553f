"""fp16 against fp32 (and bf16) on one full-size DiT block: the error `--dtype fp16` (T4, 20xx, 10xx, P100) adds.

One T2V-A14B block (dim 5120) and one TI2V-5B block (dim 3072), weights drawn as the official `init_weights`
does (xavier-uniform Linears; no real weights can be downloaded here), run on `tokens` tokens (520 = ten rows of
a 480p latent frame) with a 512-token text context. The hidden states entering the block are N(0, s) for several s,
and once with a few outlier channels (the massive activations large DiTs grow in their residual stream), so the
table shows where fp16's 65504 ceiling starts to matter.

Half-precision GEMMs and attention run as a GPU's tensor cores do (inputs rounded to the half type, fp32
accumulation, output rounded to the half type), emulated with fp32 kernels because this CPU has no fast half
GEMM; every other op runs in the half type as on the GPU, norms and modulation in fp32 as wanlite does.
Writes bench/results/fp16_block.json.  Usage: python bench/fp16_block.py [--tokens 520]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from harness import header, write_json
from torch.overrides import TorchFunctionMode

HALF = (torch.float16, torch.bfloat16)
GEMMS = {F.linear, torch.matmul, torch.bmm, torch.Tensor.matmul, F.scaled_dot_product_attention}


class HalfGemmsAccumulateInFp32(TorchFunctionMode):
    """A half-typed GEMM / attention computes in fp32 and rounds its output to the half type."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            dtypes = {a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            half = next((d for d in HALF if d in dtypes), None)
            if half is not None:
                up = lambda a: a.float() if isinstance(a, torch.Tensor) else a  # noqa: E731
                return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).to(half)
        return func(*args, **kwargs)


def block_for(spec, dtype: torch.dtype):
    from wanlite.models.blocks import WanBlock, keeps_fp32

    torch.manual_seed(0)
    block = WanBlock(spec.dim, spec.ffn_dim, spec.num_heads, spec.eps).eval().requires_grad_(False)
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for name, p in block.named_parameters():
        if not keeps_fp32(name):
            p.data = p.data.to(dtype)
    return block


def inputs_for(spec, tokens: int, scale: float, outliers: float):
    from wanlite.models.blocks import BlockInputs
    from wanlite.models.rope import rope_cos_sin

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, spec.dim, generator=g) * scale
    if outliers:  # a few channels orders of magnitude above the rest, as in trained DiTs' residuals
        x[..., :4] = outliers * torch.sign(torch.randn(1, tokens, 4, generator=g))
    inputs = BlockInputs(e0=torch.randn(1, 1, 6, spec.dim, generator=g) * 0.5,
                         context=torch.randn(1, 512, spec.dim, generator=g),
                         rope=rope_cos_sin((1, tokens // 52, 52), spec.head_dim))  # 480p rows
    return x, inputs


def snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = (ref - got).double().pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / err))


def main() -> int:
    from wanlite.specs import DIT_SPECS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=520, help="a multiple of 52 (one 480p latent row)")
    args = parser.parse_args()
    if args.tokens % 52:
        parser.error("--tokens must be a multiple of 52")
    rows = []
    for model in ("t2v-A14B", "ti2v-5B"):
        spec = DIT_SPECS[model]
        blocks = {dtype: block_for(spec, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
        for scale, outliers in ((1.0, 0), (16.0, 0), (256.0, 0), (1.0, 3000.0), (1.0, 30000.0)):
            x, inputs = inputs_for(spec, args.tokens, scale, outliers)
            with torch.no_grad(), HalfGemmsAccumulateInFp32():
                ref = blocks[torch.float32](x, inputs)
                row = {"model": model, "dim": spec.dim, "tokens": args.tokens, "input_std": scale,
                       "outlier_channels": 4 if outliers else 0, "outlier_value": outliers, "ref_max_abs": round(float(ref.abs().max()), 1)}
                for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                    got = blocks[dtype](x.to(dtype), inputs).float()
                    finite = bool(torch.isfinite(got).all())
                    row[f"{name}_finite"] = finite
                    row[f"{name}_snr_db"] = round(snr_db(ref, got), 2) if finite else None
                    row[f"{name}_max_abs_err"] = round(float((ref - got).abs().max()), 4) if finite else None
                    # the block's update alone (output - input): what the residual add can drown in rounding
                    row[f"{name}_update_snr_db"] = round(snr_db(ref - x, got - x.to(dtype).float()), 2) if finite else None
            print(row, flush=True)
            rows.append(row)
    write_json("fp16_block", {**header(), "emulation": "half GEMMs and attention: fp32 accumulate, output rounded",
                              "weights": "random, official init (xavier-uniform Linears, zero biases)",
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
