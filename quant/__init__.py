"""Weight formats (FP8, INT8, GGUF) and their storage cost; `quantize_` arrives with the quant issue.

`FORMATS` is what the planner and `wanlite info` read: bytes per quantizable weight element, including the
per-block or per-channel scales each format stores.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits_per_weight: float  # payload + in-block scales, averaged over a block
    note: str
    row_scale_bytes: int = 0  # one scale per output row (per-channel formats)


FORMATS = {
    "bf16": WeightFormat("bf16", 16.0, "unquantized"),
    "fp8": WeightFormat("fp8", 8.0, "e4m3fn + one fp32 scale per output channel", row_scale_bytes=4),
    "int8": WeightFormat("int8", 8.0, "weight-only int8 + one fp32 scale per output channel", row_scale_bytes=4),
    "Q8_0": WeightFormat("Q8_0", 34 * 8 / 32, "GGUF: 32 int8 + one fp16 scale per block"),
    "Q4_K": WeightFormat("Q4_K", 144 * 8 / 256, "GGUF: 256 4-bit values + scales per super-block"),
}


def is_quantizable(name: str, shape) -> bool:
    """The transformer blocks' matmul weights: the bulk of every model; embeddings, norms, modulation and the
    head stay in bf16, as ComfyUI and GGUF releases keep them."""
    return name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2


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
