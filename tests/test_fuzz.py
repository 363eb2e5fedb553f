"""Hostile and damaged checkpoint files (issue 38): seeded mutations of tiny valid safetensors, GGUF and .pth
files are either read back with their declared shapes or refused with wanlite's one-line error, never a foreign
exception or a hang; and one test per class of defect the fuzzing found. The long run is bench/fuzz.py."""
import faulthandler
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import check_checkpoint, dit_spec_from_shapes
from wanlite.loading.safetensors_file import read_header
from wanlite.loading.stream import open_source, sniff
from wanlite.models.t5 import t5_spec_from_shapes
from wanlite.quant.gguf_file import read_gguf
from wanlite.tiny import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
CASES = {"safetensors": 2000, "gguf": 2000, "pth": 1000}  # ~40 s together on two shared CPU cores
CASE_LIMIT_S = 20  # one case past this is a hang: the watchdog dumps every thread's stack and exits


def _load_bench_fuzz():
    spec = importlib.util.spec_from_file_location("wanlite_bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    return _load_bench_fuzz()


@pytest.fixture(scope="module")
def seeds(fuzz, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    files = fuzz.seed_files(folder)
    for fmt, name in (("safetensors", "seed.safetensors"), ("gguf", "seed.gguf"), ("pth", "seed.pth")):
        fuzz.read_all(folder / name)  # the seeds themselves are valid (and the imports are paid here)
    return files


def _bounded(fn, *args, limit: float = CASE_LIMIT_S):
    faulthandler.dump_traceback_later(limit, exit=True)
    try:
        return fn(*args)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "pth"])
def test_mutants_are_read_or_refused_in_one_line(fuzz, seeds, fmt, tmp_path):
    fields = [fuzz._gguf_fields(s) for s in seeds[fmt]] if fmt == "gguf" else []
    path = tmp_path / ("case" + fuzz.SUFFIX[fmt])
    counts, foreign = Counter(), []
    for case in range(CASES[fmt]):
        data, label = fuzz.mutant(fmt, seeds[fmt], fields, case, 38)
        path.write_bytes(data)
        outcome, detail = _bounded(fuzz.classify, path, fmt)
        counts[outcome] += 1
        if outcome == "foreign":
            foreign.append(f"case {case} ({label}): {detail}")
    assert not foreign, f"{len(foreign)} foreign outcomes, first: {foreign[0]}"
    # the reference reader refuses nothing wanlite accepts, and the mutations reach both outcomes
    assert counts["accepted_reference_refuses"] == 0
    assert counts["accepted"] > CASES[fmt] // 20 and counts["refused"] > CASES[fmt] // 5, counts


# ---- one test per class ----

def _padded_header_file(src: Path, dst: Path, header_len: int) -> Path:
    """`src` rewritten with its header JSON padded with spaces to `header_len` bytes (the format allows it)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n].rstrip(b" ")
    assert len(text) <= header_len
    dst.write_bytes(struct.pack("<Q", header_len) + text + b" " * (header_len - len(text)) + data[8 + n:])
    return dst


@pytest.mark.parametrize("header_len", [128 + 256 * 40, 0x280])  # 0x80 0x28 ..., and 0x80 0x02: pickle-like
def test_safetensors_whose_header_length_starts_with_0x80_is_read_as_safetensors(tmp_path, header_len):
    src = checkpoint_dir("tiny-t2v")
    root = tmp_path / "ckpt"
    shutil.copytree(src, root)
    shard = root / "high_noise_model" / "diffusion_pytorch_model-00001-of-00001.safetensors"
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    if header_len < n:
        header_len += 256 * (-(-(n - header_len) // 256))
    _padded_header_file(shard, shard, header_len)
    assert shard.read_bytes()[0] == 0x80
    assert sniff(shard) == "safetensors"
    assert set(open_source([shard]).shapes()) == set(read_header(shard)[0])
    ckpt = discover(root)
    assert set(ckpt.dits) == {"high_noise", "low_noise"}  # not "missing its high-noise expert"
    check_checkpoint(ckpt, "tiny-t2v")


def test_legacy_pickle_is_still_sniffed_as_pth(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x80\x02" + bytes(30))  # protocol 2, no safetensors header fits a 32-byte file
    assert sniff(path) == "pth"


def _tiny_dit_shapes():
    shard = checkpoint_dir("tiny-t2v") / "high_noise_model" / "diffusion_pytorch_model-00001-of-00001.safetensors"
    return {k: v.shape for k, v in read_header(shard)[0].items()}


@pytest.mark.parametrize("key", ["blocks.1000000000.x", "blocks." + "9" * 5000 + ".x", "blocks.40.x",
                                 "blocks.٣.x", "blocks.07.x"])
def test_huge_block_numbers_are_refused_before_building(key):
    shapes = {**_tiny_dit_shapes(), key: (0,)}
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="names block|block 2 is missing") as err:
        _bounded(dit_spec_from_shapes, shapes, {}, "dit.safetensors", limit=10)
    assert "\n" not in str(err.value) and time.perf_counter() - started < 2


def test_huge_block_number_in_a_file_is_refused_fast(tmp_path):
    from wanlite.loading.checkpoints import component_from_file
    from wanlite.loading.models import prepare_dit

    shard = checkpoint_dir("tiny-t2v") / "high_noise_model" / "diffusion_pytorch_model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["blocks.1000000000.x"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    raw = json.dumps(header).encode()
    path = tmp_path / "dit.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="names block 1000000000"):
        _bounded(lambda: prepare_dit(component_from_file("high_noise_model", path), "tiny-t2v"), limit=20)
    assert time.perf_counter() - started < 10


def test_text_encoder_layer_count_is_bounded():
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    with pytest.raises(CheckpointError, match="names layer 1000000000"):
        _bounded(t5_spec_from_shapes, {q: (64, 64), "encoder.block.1000000000.layer.0.SelfAttention.q.weight": (0,)},
                 "t5.safetensors", limit=10)
    with pytest.raises(CheckpointError, match="layer 1 is missing among layers 0..2"):  # 3 layers need 3 keys
        t5_spec_from_shapes({q: (64, 64), "encoder.block.2.layer.0.SelfAttention.q.weight": (64, 64)}, "t5")
    valid = {"shared.weight": (384, 64), bias: (32, 4), q: (64, 64),
             "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (128, 64)}
    assert t5_spec_from_shapes(valid, "t5").num_heads == 4
    with pytest.raises(CheckpointError, match="attention heads do not divide"):
        t5_spec_from_shapes({**valid, bias: (32, 3)}, "t5")
    with pytest.raises(CheckpointError, match=r"has shape \(32, 0\), which no umT5 encoder has"):  # 0 heads
        t5_spec_from_shapes({**valid, bias: (32, 0)}, "t5")
    with pytest.raises(CheckpointError, match="t5: not a umT5 encoder .*'shared.weight' is missing"):
        t5_spec_from_shapes({k: v for k, v in valid.items() if k != "shared.weight"}, "t5")


@pytest.mark.parametrize("edit", ["digits", "nan", "duplicate", "nesting", "utf16", "hole", "tail", "bool_dim",
                                  "empty_huge_dim", "list_dtype"])
def test_safetensors_header_edits_are_one_line(tmp_path, edit):
    import torch

    from wanlite.loading.writers import save_safetensors

    src = tmp_path / "src.safetensors"
    save_safetensors({"a": torch.ones(2), "b": torch.ones(3)}, src)
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text, body = data[8:8 + n].decode().rstrip(), data[8 + n:]
    header = json.loads(text)
    if edit == "digits":
        text = text.replace('"shape":[2]', '"shape":[' + "1" * 5000 + "]")
    elif edit == "nan":
        text = text.replace('"shape":[2]', '"shape":[NaN]')
    elif edit == "duplicate":
        text = text[:-1] + ',"a":' + json.dumps(header["a"]) + "}"
    elif edit == "nesting":
        text = text[:-1] + ',"deep":' + "[" * 100000 + "]" * 100000 + "}"
    elif edit == "hole":
        body = body[:8] + bytes(4) + body[8:]
        header["b"]["data_offsets"] = [12, 24]
        text = json.dumps(header)
    elif edit == "tail":
        body += bytes(4)
    elif edit == "bool_dim":
        header["a"]["shape"] = [True, 2]
        text = json.dumps(header)
    elif edit == "empty_huge_dim":
        header["c"] = {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [20, 20]}
        text = json.dumps(header)
    elif edit == "list_dtype":
        header["a"]["dtype"] = ["F32"]
        text = json.dumps(header)
    raw = text.encode("utf-16-le" if edit == "utf16" else "utf-8")
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    with pytest.raises(CheckpointError) as err:
        _bounded(open_source, [path], limit=10)
    assert "\n" not in str(err.value)


# ---- GGUF: the metadata gguf-py's reader loops on, refused by the bounded pre-parser ----

@pytest.fixture(scope="module")
def gguf_seed(fuzz, seeds):
    return seeds["gguf"][0]  # string, integer and nested arrays in its metadata


def _field(fuzz, data: bytes, what: str, nth: int = 0) -> int:
    return [at for name, at in fuzz._gguf_fields(data) if name == what][nth]


def _refused_fast(tmp_path, data: bytes, match: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as err:
        _bounded(read_gguf, path, limit=10)
    assert "\n" not in str(err.value) and time.perf_counter() - started < 2


def test_gguf_string_to_array_type_flip_is_refused_fast(fuzz, gguf_seed, tmp_path):
    data = bytearray(gguf_seed)
    at = _field(fuzz, gguf_seed, "value_type", 0)  # general.architecture: a string
    assert struct.unpack_from("<I", data, at)[0] == 8
    struct.pack_into("<I", data, at, 9)  # now an array: its length is read as an item type and a count
    _refused_fast(tmp_path, bytes(data), "truncated or damaged GGUF")


@pytest.mark.parametrize("count", [2**62, 2**64 - 1, 10**6])
def test_gguf_array_count_past_the_end_is_refused_fast(fuzz, gguf_seed, tmp_path, count):
    data = bytearray(gguf_seed)
    struct.pack_into("<Q", data, _field(fuzz, gguf_seed, "array_count", 0), count)  # tokenizer.ggml.tokens
    _refused_fast(tmp_path, bytes(data), "does not fit")


def test_gguf_arrays_nested_deeper_than_two_are_refused(fuzz, gguf_seed, tmp_path):
    data = bytearray(gguf_seed)
    inner = [at for name, at in fuzz._gguf_fields(gguf_seed) if name == "array_type"]
    struct.pack_into("<I", data, inner[3], 9)  # fuzz.nested's first inner array now holds arrays
    _refused_fast(tmp_path, bytes(data), "truncated or damaged GGUF")


@pytest.mark.parametrize("field,value,match", [
    ("n_tensors", 2**62, "tensor count"), ("n_kv", 2**62, "metadata count"), ("key_len", 2**40, "does not fit"),
    ("n_dims", 99, "dimensions"), ("tensor_type", 77, "unknown GGML type"), ("version", 1, "version 1"),
])
def test_gguf_counts_and_codes_are_bounded(fuzz, gguf_seed, tmp_path, field, value, match):
    data = bytearray(gguf_seed)
    at = _field(fuzz, gguf_seed, field, 0)
    struct.pack_into("<I" if field in fuzz.WIDTH else "<Q", data, at, value)
    _refused_fast(tmp_path, bytes(data), match)


def test_gguf_misaligned_and_overlapping_offsets_are_refused(fuzz, gguf_seed, tmp_path):
    offsets = [at for name, at in fuzz._gguf_fields(gguf_seed) if name == "tensor_offset"]
    data = bytearray(gguf_seed)
    struct.pack_into("<Q", data, offsets[1], struct.unpack_from("<Q", data, offsets[1])[0] + 1)
    _refused_fast(tmp_path, bytes(data), "not a multiple of the alignment")
    data = bytearray(gguf_seed)
    struct.pack_into("<Q", data, offsets[1], struct.unpack_from("<Q", data, offsets[0])[0])
    _refused_fast(tmp_path, bytes(data), "overlap")


# ---- special files and check / generate agreement ----

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_safetensors_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    started = time.perf_counter()
    assert _bounded(sniff, fifo, limit=10) is None
    with pytest.raises(CheckpointError, match="pipe, device or socket"):
        _bounded(open_source, [fifo], limit=10)
    with pytest.raises(CheckpointError, match="pipe, device or socket"):
        _bounded(read_header, fifo, limit=10)
    index = tmp_path / "x.safetensors.index.json"
    os.mkfifo(index)
    with pytest.raises(CheckpointError, match="pipe, device or socket"):
        _bounded(discover, tmp_path, limit=10)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("damage", ["truncated", "charsmap"])  # a plain Exception; a Rust panic (BaseException)
def test_a_damaged_tokenizer_fails_check_not_only_generate(tmp_path, damage):
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("tiny-t2v"), root)
    tokenizer = root / "google" / "umt5-xxl" / "tokenizer.json"
    if damage == "truncated":
        tokenizer.write_bytes(tokenizer.read_bytes()[:5000])
    else:
        data = json.loads(tokenizer.read_text(encoding="utf-8"))
        data["normalizer"]["precompiled_charsmap"] = "AAA=AAAA"
        tokenizer.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer") as err:
        check_checkpoint(discover(root), "tiny-t2v")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(sys.platform == "win32", reason="the watchdog exit is POSIX-tested")
def test_watchdog_is_disarmed_after_each_case():
    assert _bounded(lambda: 7, limit=1) == 7
    time.sleep(1.2)  # still alive: the timer was cancelled
