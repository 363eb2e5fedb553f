"""Wan GGUF files written independently with gguf.GGUFWriter + gguf.quants.quantize read back exactly, and
damaged or foreign files fail with one clear line."""
import numpy as np
import pytest
import torch

from wanlite.errors import CheckpointError
from wanlite.quant.gguf_file import read_gguf


def write_gguf(path, arch="wan", qtype="Q8_0", prefix="", extra=None):
    import gguf

    rng = np.random.default_rng(0)
    weights = {
        "patch_embedding.weight": rng.normal(size=(64, 16, 1, 2, 2)).astype(np.float32),  # 5-D, kept F32
        "blocks.0.self_attn.q.weight": rng.normal(size=(64, 256)).astype(np.float32),
        "blocks.0.self_attn.norm_q.weight": rng.normal(size=(64,)).astype(np.float32),
        "head.modulation": rng.normal(size=(1, 2, 64)).astype(np.float32),
    }
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in weights.items():
        if name == "blocks.0.self_attn.q.weight":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(prefix + name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(prefix + name, value)
    for name, (raw, kind) in (extra or {}).items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_reads_quantized_and_5d_tensors_in_torch_order(tmp_path, qtype):
    import gguf

    weights = write_gguf(tmp_path / "wan.gguf", qtype=qtype, prefix="model.diffusion_model.")
    tensors = read_gguf(tmp_path / "wan.gguf")
    assert set(tensors) == set(weights)  # ComfyUI prefix stripped
    q = tensors["blocks.0.self_attn.q.weight"]
    assert (q.qtype, q.shape) == (qtype, (64, 256))
    kind = gguf.GGMLQuantizationType[qtype]
    reference = gguf.quants.dequantize(gguf.quants.quantize(weights[q.name], kind), kind)
    assert torch.equal(q.dequantize(), torch.from_numpy(reference))
    rel = (q.dequantize() - torch.from_numpy(weights[q.name])).norm() / np.linalg.norm(weights[q.name])
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.15, "Q5_1": 0.06}[qtype]
    patch = tensors["patch_embedding.weight"]
    assert patch.shape == (64, 16, 1, 2, 2) and patch.qtype == "F32"
    assert torch.equal(patch.dequantize(), torch.from_numpy(weights["patch_embedding.weight"]))
    assert tensors["head.modulation"].dequantize(torch.bfloat16).shape == (1, 2, 64)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")


def test_truncated_file(tmp_path):
    write_gguf(tmp_path / "wan.gguf")
    data = (tmp_path / "wan.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-300])
    with pytest.raises(CheckpointError, match="truncated or damaged|past the end of the file"):
        read_gguf(tmp_path / "cut.gguf")


def test_other_architecture(tmp_path):
    write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama', not a Wan model"):
        read_gguf(tmp_path / "llama.gguf")


def test_unsupported_type_names_tensor_and_type(tmp_path):
    import gguf

    kind = gguf.GGMLQuantizationType.IQ2_XXS
    values, nbytes = gguf.GGML_QUANT_SIZES[kind]
    raw = np.zeros((4, 256 // values * nbytes), np.uint8)
    write_gguf(tmp_path / "iq.gguf", extra={"blocks.0.ffn.0.weight": (raw, kind)})
    with pytest.raises(CheckpointError, match="'blocks.0.ffn.0.weight' has GGUF type IQ2_XXS"):
        read_gguf(tmp_path / "iq.gguf")


def _patch_tensor_info(data: bytes, name: str, dims=None, offset=None) -> bytes:
    """Rewrite one tensor-info record of a GGUF header: name (u64 length + bytes), n_dims u32, dims u64[n],
    type u32, offset u64."""
    import struct

    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    out = bytearray(data)
    if dims is not None:
        struct.pack_into(f"<{n_dims}Q", out, at + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", out, at + 4 + 8 * n_dims + 4, offset)
    return bytes(out)


def test_tensor_offset_past_the_end_of_the_file(tmp_path):
    write_gguf(tmp_path / "wan.gguf")
    data = _patch_tensor_info((tmp_path / "wan.gguf").read_bytes(), "blocks.0.self_attn.q.weight", offset=1 << 30)
    (tmp_path / "far.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or damaged|lies past the end of the file"):
        read_gguf(tmp_path / "far.gguf")


def test_row_that_is_not_a_whole_number_of_blocks(tmp_path):
    write_gguf(tmp_path / "wan.gguf")
    # Q8_0 packs 32 values per block: 250 values per row leave a truncated block
    data = _patch_tensor_info((tmp_path / "wan.gguf").read_bytes(), "blocks.0.self_attn.q.weight", dims=(250, 64))
    (tmp_path / "cut.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"truncated or damaged GGUF file .*250.* not a multiple of Q8_0"):
        read_gguf(tmp_path / "cut.gguf")
