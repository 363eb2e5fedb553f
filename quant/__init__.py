"""Weight formats (FP8, INT8, GGUF): `quantize_(model, config)`, the configs, and their storage cost.

`FORMATS` is what the planner and `wanlite info` read: bits per quantizable weight element, including the
per-block or per-row scales each format stores. `parse_quant` turns `--quant` / `--quant-backend` into a config.
"""
from __future__ import annotations

from dataclasses import dataclass

from wanlite.errors import WanliteError
from wanlite.quant.base import (
    HANDLERS,
    DenseConfig,
    QLinear,
    QuantConfig,
    QuantizedWeight,
    build_linear,
    is_quantizable,
    quantize_,
    sqnr,
)
from wanlite.quant.fp8 import Fp8WeightConfig
from wanlite.quant.gguf import FLOAT_TYPES, GGUFWeightConfig
from wanlite.quant.gguf_quantize import QUANTIZABLE
from wanlite.quant.gguf_dequant import BLOCKS
from wanlite.quant.int8 import BACKENDS, Int8WeightConfig

__all__ = ["quantize_", "QuantConfig", "DenseConfig", "Fp8WeightConfig", "Int8WeightConfig", "GGUFWeightConfig",
           "QLinear", "QuantizedWeight", "build_linear", "is_quantizable", "sqnr", "HANDLERS", "FORMATS",
           "QUANT_CHOICES", "parse_quant", "weight_bytes", "BACKENDS", "config_for_stored"]


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits_per_weight: float  # payload + in-block scales, averaged over a block
    note: str
    row_scale_bytes: int = 0  # one scale per output row (per-channel formats)


def _gguf(qtype: str, note: str) -> WeightFormat:
    values, nbytes = BLOCKS[qtype]
    return WeightFormat(qtype, nbytes * 8 / values, f"GGUF: {note}")


FORMATS = {
    "bf16": WeightFormat("bf16", 16.0, "unquantized"),
    "fp8": WeightFormat("fp8", 8.0, "e4m3fn + one fp32 scale per output channel", row_scale_bytes=4),
    "int8": WeightFormat("int8", 8.0, "weight-only int8 + one fp32 scale per output channel", row_scale_bytes=4),
    "Q8_0": _gguf("Q8_0", "32 int8 + one fp16 scale per block"),
    "Q6_K": _gguf("Q6_K", "6-bit, 16 int8 scales per 256-value super-block"),
    "Q5_K": _gguf("Q5_K", "5-bit, 6-bit scales and mins per 32 values"),
    "Q4_K": _gguf("Q4_K", "4-bit, 6-bit scales and mins per 32 values"),
    "Q4_0": _gguf("Q4_0", "4-bit, one fp16 scale per 32 values"),
}

# --quant values: "auto" keeps what the files store, "none" dequantizes everything
QUANT_CHOICES = ("auto", "none", "fp8", "fp8-e5m2", "int8", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q4_k",
                 "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0")


def parse_quant(name: str, backend: str = "torchao") -> QuantConfig | None:
    """`--quant` (+ `--quant-backend` for int8) -> a config; None means "keep the stored format"."""
    if name not in QUANT_CHOICES:
        raise WanliteError(f"--quant {name!r} is unknown; choose one of {', '.join(QUANT_CHOICES)}")
    if backend not in BACKENDS:
        raise WanliteError(f"--quant-backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return None
    if name == "none":
        return DenseConfig()
    if name.startswith("fp8"):
        return Fp8WeightConfig(dtype="e5m2" if name.endswith("e5m2") else "e4m3fn")
    if name == "int8":
        return Int8WeightConfig(backend=backend)
    return GGUFWeightConfig(qtype=name.removeprefix("gguf-").upper())


def config_for_stored(weight: QuantizedWeight) -> QuantConfig | None:
    """The config that quantizes a dense weight back into `weight`'s stored format (None: wanlite has no
    quantizer for it, e.g. GGUF IQ types)."""
    if weight.family == "fp8":
        return Fp8WeightConfig(dtype=weight.qtype)
    if weight.family == "gguf" and weight.qtype in QUANTIZABLE and weight.qtype not in FLOAT_TYPES:
        return GGUFWeightConfig(qtype=weight.qtype)
    return None


def weight_bytes(manifest: dict[str, tuple[int, ...]], fmt: str) -> int:
    """Bytes of a model whose quantizable weights are stored in `fmt` and everything else in bf16."""
    spec = FORMATS[fmt]
    total = 0.0
    for name, shape in manifest.items():
        numel = 1
        for d in shape:
            numel *= d
        if is_quantizable(name, shape):
            total += numel * spec.bits_per_weight / 8 + shape[0] * spec.row_scale_bytes
        else:
            total += numel * 2
    return int(total)
