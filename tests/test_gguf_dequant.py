"""wanlite's torch GGUF dequantization is bit-exact against gguf-py's reference for every supported type."""
import numpy as np
import pytest
import torch

from wanlite.quant.gguf_dequant import BLOCKS, UnsupportedQuantType, dequantize

# byte offsets of each block's fp16 fields (scales and mins), to keep them finite in random blocks
HALF_FIELDS = {"Q8_0": (0,), "IQ4_NL": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for at in HALF_FIELDS.get(qtype, ()):
        raw[:, at:at + 2] = rng.normal(0, 0.05, size=(n, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", list(HALF_FIELDS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_gguf_py_bit_for_bit(qtype, seed):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    raw = random_blocks(qtype, 64, seed)
    want = reference(raw, GGMLQuantizationType[qtype]).reshape(-1)
    values = BLOCKS[qtype][0] * 64
    got = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, (values // 128, 128))
    np.testing.assert_array_equal(got.numpy().reshape(-1), want)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_float_types_are_reinterpreted(qtype):
    x = torch.randn(4, 8).to({"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[qtype])
    raw = x.contiguous().view(torch.uint8).reshape(-1)
    assert torch.equal(dequantize(raw, qtype, (4, 8), dtype=x.dtype), x)


def test_unknown_type_and_wrong_size_are_named():
    with pytest.raises(UnsupportedQuantType, match="blocks.0.ffn.0.weight: GGUF type IQ1_S is not supported"):
        dequantize(torch.zeros(10, dtype=torch.uint8), "IQ1_S", (32,), name="blocks.0.ffn.0.weight")
    with pytest.raises(ValueError, match="do not hold 64 Q8_0 values"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (64,))
