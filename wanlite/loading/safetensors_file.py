"""A validating safetensors reader that reads one tensor at a time with plain file reads.

`safetensors.safe_open` maps the whole shard, so every page it touches stays in the process' resident set
until the file is closed: streaming a 57 GB fp32 expert through it grows RSS by the shard size. This reader
checks every header field and offset against the file size first, then reads each tensor (in chunks, cast
on the fly) straight into its destination, so peak memory is the model plus one small scratch buffer.
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wanlite.errors import CheckpointError
from wanlite.files import regular_file_size

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit
MAX_DIMS = 8  # Wan tensors have at most 5; a header listing more is damaged
MAX_INT_DIGITS = 20  # a JSON integer longer than any u64 is refused before Python builds it
SCRATCH_BYTES = 16 * 2**20  # per-read staging for dtype casts


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is damaged or not a safetensors file, re-download it")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(text)


def _no_float(text: str):
    raise ValueError(f"{text} is not a number a safetensors header holds")


def _unique(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} appears twice")
        out[key] = value
    return out


def parse_header_json(raw: bytes):
    """json.loads with the work bounded: integers of at most 20 digits, no NaN / Infinity, no repeated keys
    (which entry would win is undefined), UTF-8 only (the spec's encoding), nesting cut off by Python's
    recursion guard; ValueError otherwise."""
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_int, parse_constant=_no_float, object_pairs_hook=_unique)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _dims_ok(shape, limit: int) -> bool:
    return (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d <= limit for d in shape))


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: every dtype, shape and offset is checked against the file."""
    path = Path(path)
    size = regular_file_size(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"only {size} bytes long")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {header_len} is beyond the format's limit")
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated: its header alone needs {8 + header_len} bytes but the "
                                      f"file holds {size}; the download is incomplete, re-download it")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: truncated while reading its header; re-download it")
    if header_len < 2 or raw[:1] != b"{":
        raise _bad(path, "header does not start with '{'")
    try:
        header = parse_header_json(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(path, f"header is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype_name = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            shown = dtype_name if isinstance(entry, dict) else entry
            raise _bad(path, f"tensor {name!r} has an unknown dtype {str(shown)[:40]!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        # no dimension can exceed the file's size: every element takes at least one byte, and an empty
        # tensor with a huge other dimension is damage, not data
        if not _dims_ok(shape, max(size, 1)):
            raise _bad(path, f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _bad(path, f"tensor {name!r} has invalid data_offsets {str(offsets)[:80]}")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise _bad(path, f"tensor {name!r} spans bytes {begin}..{end} but its shape needs {nbytes}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file holds only "
                f"{data_size}; the download is incomplete, re-download it")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(dtype, tuple(shape), data_start + begin, nbytes)
    # the format's rule (the reference reader enforces it too): the tensors tile the data section exactly. A hole
    # or a tail is how a shifted header or an inserted run of bytes shows, which would otherwise read wrong data
    spans.sort()
    covered, last = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise _bad(path, f"tensors {last!r} and {name!r} overlap")
        if begin > covered:
            raise _bad(path, f"bytes {covered}..{begin} of the data belong to no tensor (before {name!r})")
        covered, last = end, name
    if covered != data_size:
        raise _bad(path, f"{data_size - covered} bytes after the last tensor belong to no tensor")
    return tensors, metadata


class SafetensorsFile:
    """Open shard: `keys()`, `info(key)` and `read_into(key, out)`; use as a context manager."""

    def __init__(self, path: Path):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors files are little-endian; this machine is big-endian")
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._file = None
        self._scratch: torch.Tensor | None = None

    def __enter__(self):
        self._file = self.path.open("rb")
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._file = None
        self._scratch = None

    def keys(self):
        return self.tensors.keys()

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def _readinto(self, view: memoryview, offset: int, key: str):
        self._file.seek(offset)
        got = self._file.readinto(view)
        if got != len(view):
            raise CheckpointError(f"{self.path}: truncated while reading {key!r}; re-download it")

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor `out` (any float dtype, same numel) with tensor `key`, casting in chunks."""
        info = self.tensors[key]
        if out.numel() * info.dtype.itemsize != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {info.nbytes} bytes, expected shape {tuple(out.shape)}")
        if info.nbytes == 0:
            return out
        flat_out = out.view(-1)
        if out.dtype == info.dtype:
            self._readinto(memoryview(flat_out.view(torch.uint8).numpy()), info.begin, key)
            return out
        item = info.dtype.itemsize
        chunk_elems = max(1, SCRATCH_BYTES // item)
        if self._scratch is None:
            self._scratch = torch.empty(SCRATCH_BYTES + item, dtype=torch.uint8)
        numel = info.nbytes // item
        for start in range(0, numel, chunk_elems):
            n = min(chunk_elems, numel - start)
            buf = self._scratch[: n * item]
            self._readinto(memoryview(buf.numpy()), info.begin + start * item, key)
            flat_out[start:start + n].copy_(buf.view(info.dtype))
        return out

    def raw_head(self, key: str, n: int) -> bytes:
        """The first `n` bytes of tensor `key` as the file stores them (no cast): a bounded read for comparing
        files without loading them."""
        info = self.tensors[key]
        try:
            with self.path.open("rb") as f:
                f.seek(info.begin)
                return f.read(min(n, info.nbytes))
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=dtype or info.dtype)
        return self.read_into(key, out)
