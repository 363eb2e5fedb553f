"""Wan GGUF files (city96 / QuantStack layout), read by a bounded parser of wanlite's own.

Files are untrusted. The header (magic, version, counts), every metadata key and value (type codes, string
lengths, array counts and nesting), every tensor record (name, dims, GGML type, offset) and the alignment are
checked against the bytes that remain in the file before anything is looped over, allocated or built; tensor
data ranges must be aligned, inside the file, and laid out back to back as writers lay them out. Only then is a tensor's raw bytes handed out, as a
read-only view of one memory map with its GGML type and torch-order shape; `GGUFTensor.dequantize` turns them
into floats on whatever device the bytes are moved to. gguf-py's `GGUFReader` is not used here: on damaged
metadata it loops and grows without bound.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite.errors import CheckpointError
from wanlite.files import regular_file_size
from wanlite.quant.gguf_dequant import BLOCKS, dequantize

COMFY_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# keys that identify a Wan DiT when a file carries no architecture (city96's loader does the same)
WAN_KEYS = ("blocks.0.self_attn.norm_q.weight", "head.modulation")

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # GGML_MAX_DIMS is 4, but gguf-py writes 5-D patch embeddings as they are
MAX_NAME_BYTES = 65535  # the format's limit for keys; tensor names are far shorter in practice
MAX_ARRAY_DEPTH = 2  # an array of arrays at most; deeper nesting is refused, not recursed into
MAX_ORIG_DIMS = 8
# value type code -> struct format of a scalar; 8 is a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
STRING, ARRAY = 8, 9
UINT32 = 4


class NotWanGGUF(CheckpointError):
    """A valid GGUF file for another architecture."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: str  # GGML type name: "Q4_K", "BF16", ...
    shape: tuple[int, ...]  # torch order
    raw: np.ndarray  # uint8 bytes, a view into the file

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        with warnings.catch_warnings():  # the map is read-only on purpose; nothing writes through this view
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(self.raw).reshape(-1))
        if device is not None:
            raw = raw.to(device, non_blocking=True)
        return dequantize(raw, self.qtype, self.shape, dtype, self.name)


@dataclass(frozen=True)
class TensorRecord:
    name: str
    type_code: int
    dims: tuple[int, ...]  # GGML order: dims[0] is the innermost (row) dimension
    offset: int  # from the start of the data section


class _Damaged(Exception):
    """Raised inside the parser; `read_gguf` turns it into one CheckpointError line."""


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file: nothing is read past `size`."""

    def __init__(self, data: np.ndarray):
        self.data, self.size, self.pos = data, len(data), 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Damaged(f"{what} needs {n} bytes at offset {self.pos} but the file ends at {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += n
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count whose items (at least `min_item_bytes` each) must fit in the rest of the file."""
        n = self.unpack("<Q", what)
        if min_item_bytes and n > self.left() // min_item_bytes:
            raise _Damaged(f"{what} {n} does not fit in the {self.left()} bytes left in the file")
        return n

    def string(self, what: str, limit: int | None = MAX_NAME_BYTES) -> str | None:
        """A u64-length-prefixed UTF-8 string; longer than `limit`: skipped and None (limit None keeps all)."""
        n = self.count(what + " length", 1)
        if limit is not None and n > limit:
            self.pos += n
            return None
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} is not UTF-8") from None


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0, keep: bool = False):
    """Read (or skip) one metadata value of type code `vtype`; strings and integer arrays are returned when
    `keep`, everything else is skipped after its bounds are checked."""
    if vtype in SCALARS:
        return cur.unpack(SCALARS[vtype], f"metadata {key!r}")
    if vtype == STRING:
        return cur.string(f"metadata {key!r}", 4096 if keep else 0)
    if vtype != ARRAY:
        raise _Damaged(f"metadata {key!r} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise _Damaged(f"metadata {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    itype = cur.unpack("<I", f"metadata {key!r} item type")
    if itype in SCALARS:
        item = struct.calcsize(SCALARS[itype])
        n = cur.count(f"metadata {key!r} array count", item)
        if keep and itype in INTEGER_TYPES and n <= MAX_ORIG_DIMS:
            return [cur.unpack(SCALARS[itype], f"metadata {key!r}") for _ in range(n)]
        cur.pos += n * item
        return None
    if itype == STRING:
        n = cur.count(f"metadata {key!r} array count", 8)
        for _ in range(n):
            length = cur.count(f"metadata {key!r} string length", 1)
            cur.pos += length
        return None
    if itype == ARRAY:
        n = cur.count(f"metadata {key!r} array count", 12)
        for _ in range(n):
            _value(cur, ARRAY, key, depth + 1)
        return None
    raise _Damaged(f"metadata {key!r} is an array of unknown value type {itype}")


def _new_name(cur, seen: set[str], what: str, kind: str) -> str:
    """The next string, a name not seen before in its section."""
    name = cur.string(f"a {what}")
    if not name:
        raise _Damaged(f"a {what} is empty or longer than the format allows")
    if name in seen:
        raise _Damaged(f"{kind} {name!r} appears twice")
    seen.add(name)
    return name


def parse_gguf(data: np.ndarray) -> tuple[dict, list[TensorRecord], int]:
    """Parse a GGUF header from the mapped bytes `data`: (kept metadata, tensor records, data section start).
    Kept metadata: general.architecture (a string), general.alignment and the comfy orig-shape arrays."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(data)
    cur.need(4, "the magic")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in VERSIONS:
        raise _Damaged(f"GGUF version {version} is not one wanlite reads (2 or 3, little-endian)")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.count("the metadata count", 13)  # key length 8 + at least 1 key byte + type 4 + 1 value byte
    if n_tensors > cur.left() // 32:  # name length 8, n_dims 4, one dim 8, type 4, offset 8
        raise _Damaged(f"the tensor count {n_tensors} does not fit in the file")
    meta: dict = {}
    seen: set[str] = set()
    for _ in range(n_kv):
        key = _new_name(cur, seen, "metadata key", "metadata")
        vtype = cur.unpack("<I", f"metadata {key!r} type")
        keep = key in ("general.architecture", "general.alignment") or key.startswith(ORIG_SHAPE_KEY)
        value = _value(cur, vtype, key, keep=keep)
        if key == "general.architecture":
            if vtype != STRING or value is None:
                raise _Damaged("general.architecture is not a short string")
        elif key == "general.alignment":
            if vtype != UINT32 or value == 0 or value & (value - 1):
                raise _Damaged(f"general.alignment must be a power-of-two uint32, found {value!r}")
        elif keep and not (vtype == ARRAY and isinstance(value, list)):
            raise _Damaged(f"metadata {key!r} must be an array of at most {MAX_ORIG_DIMS} integers")
        if keep:
            meta[key] = value
    records: list[TensorRecord] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = _new_name(cur, names, "tensor name", "tensor")
        n_dims = cur.unpack("<I", f"tensor {name!r} dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = tuple(cur.unpack("<Q", f"tensor {name!r} shape") for _ in range(n_dims))
        code = cur.unpack("<I", f"tensor {name!r} type")
        offset = cur.unpack("<Q", f"tensor {name!r} offset")
        records.append(TensorRecord(name, code, dims, offset))
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    start = -(-cur.pos // alignment) * alignment
    if not records:  # a vocabulary-only file: no data section to check (and another model's, as read_gguf says)
        return meta, records, start
    data_size = cur.size - start
    if data_size < 0:
        raise _Damaged(f"the data section would start at byte {start}, past the end of the file")
    spans = []
    for rec in records:
        try:
            kind = GGMLQuantizationType(rec.type_code)
        except ValueError:
            raise _Damaged(f"tensor {rec.name!r} has unknown GGML type code {rec.type_code}") from None
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if not all(d >= 1 for d in rec.dims):
            raise _Damaged(f"tensor {rec.name!r} has an empty dimension {list(rec.dims)}")
        if rec.dims[0] % block:
            raise _Damaged(f"tensor {rec.name!r}: its rows of {rec.dims[0]} values are not a multiple of "
                           f"{kind.name}'s block of {block}")
        numel = 1
        for d in rec.dims:
            numel *= d
        nbytes = numel // block * block_bytes
        if rec.offset % alignment:
            raise _Damaged(f"tensor {rec.name!r} starts at data offset {rec.offset}, not a multiple of the "
                           f"alignment {alignment}")
        if rec.offset + nbytes > data_size:
            raise CheckpointError(f"tensor {rec.name!r} lies past the end of the file (bytes {start + rec.offset}.."
                                  f"{start + rec.offset + nbytes} of {cur.size}); the download is incomplete")
        spans.append((rec.offset, rec.offset + nbytes, rec.name))
    # the layout every GGUF writer produces (and llama.cpp's loader requires): each tensor starts where the one
    # before it ends, padded to the alignment, and the file ends after the last one (padded or not). A gap, an
    # overlap or a tail is how a damaged dimension, type or offset, or bytes inserted into the data, show
    spans.sort()
    expected, last = 0, None
    for begin, end, name in spans:
        if begin < expected:
            raise _Damaged(f"tensors {last!r} and {name!r} overlap")
        if begin > expected:
            raise _Damaged(f"data bytes {expected}..{begin} before tensor {name!r} belong to no tensor")
        expected, last = -(-end // alignment) * alignment, name
    end = spans[-1][1]
    if not end <= data_size <= expected:
        raise _Damaged(f"the data section holds {data_size} bytes but its tensors end at byte {end}")
    return meta, records, start


def read_gguf(path: Path) -> dict[str, GGUFTensor]:
    """{original Wan key: GGUFTensor} of a Wan GGUF file, after checking everything the loader will touch."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = regular_file_size(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot map ({exc})") from None
    try:
        meta, records, start = parse_gguf(data)
    except _Damaged as exc:
        raise CheckpointError(f"{path}: truncated or damaged GGUF file ({str(exc)[:200]}); download it again") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    arch = meta.get("general.architecture")
    stripped = {r.name[len(COMFY_PREFIX):] if r.name.startswith(COMFY_PREFIX) else r.name for r in records}
    if arch != "wan" and not (arch is None and all(k in stripped for k in WAN_KEYS)):
        raise NotWanGGUF(f"{path}: a GGUF for architecture {arch!r}, not a Wan model ('wan'); "
                         "pick a Wan2.2 GGUF (e.g. city96 or QuantStack)")
    tensors: dict[str, GGUFTensor] = {}
    for rec in records:
        name = rec.name[len(COMFY_PREFIX):] if rec.name.startswith(COMFY_PREFIX) else rec.name
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is stored twice (with and without the ComfyUI prefix)")
        kind = GGMLQuantizationType(rec.type_code)
        qtype = kind.name
        if qtype not in BLOCKS:
            raise CheckpointError(f"{path}: tensor {name!r} has GGUF type {qtype}, which wanlite cannot dequantize "
                                  f"(supported: {', '.join(BLOCKS)})")
        block, block_bytes = GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(rec.dims))  # dims[0] is the innermost torch dim
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel // block * block_bytes
        orig = meta.get(ORIG_SHAPE_KEY + rec.name)
        if orig is not None:
            prod = 1
            for d in orig:
                prod *= d
            if any(d < 0 for d in orig) or prod != numel:
                raise CheckpointError(f"{path}: {ORIG_SHAPE_KEY}{rec.name} = {tuple(orig)} does not fit {numel} "
                                      "values; the file is damaged")
            shape = tuple(orig)
        begin = start + rec.offset
        tensors[name] = GGUFTensor(name, qtype, shape, data[begin:begin + nbytes])
    return tensors
