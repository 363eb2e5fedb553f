"""Random GGUF blocks with finite fp16 scales: inputs for dequantization tests and benchmarks."""
from __future__ import annotations

import numpy as np

from wanlite.quant.gguf_dequant import BLOCKS

# byte offsets of each block type's fp16 fields (scales and mins); random bytes there could be inf or NaN
HALF_FIELDS = {"Q8_0": (0,), "IQ4_NL": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, bytes per block]: random payload, scales drawn from N(0, 0.05) as fp16."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, BLOCKS[qtype][1]), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        raw[:, at:at + 2] = rng.normal(0, 0.05, size=(n, 1)).astype(np.float16).view(np.uint8)
    return raw
