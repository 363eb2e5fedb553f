"""wanlite's torch GGUF dequantization is bit-exact against gguf-py's reference for every supported type."""
import numpy as np
import pytest
import torch

from wanlite.quant.gguf_dequant import BLOCKS, UnsupportedQuantType, dequantize
from wanlite.testing.gguf_blocks import HALF_FIELDS, random_blocks


def test_every_block_type_is_covered():
    assert set(HALF_FIELDS) == {t for t, (values, _) in BLOCKS.items() if values > 1}


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
