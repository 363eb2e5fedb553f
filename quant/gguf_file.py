"""Wan GGUF files (city96 / QuantStack layout): the container through `gguf.GGUFReader`, validated before use.

Each tensor stays as its raw quantized bytes (a read-only memory map) with its GGML type and torch-order
shape; `GGUFTensor.dequantize` turns it into floats on whatever device the bytes are moved to. Files are
untrusted: the magic, the architecture, every tensor's type, byte count and data range are checked, and a
damaged file fails with one line naming the problem.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite.errors import CheckpointError
from wanlite.quant.gguf_dequant import BLOCKS, dequantize

COMFY_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# keys that identify a Wan DiT when a file carries no architecture (city96's loader does the same)
WAN_KEYS = ("blocks.0.self_attn.norm_q.weight", "head.modulation")


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


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.fields.get(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf(path: Path) -> dict[str, GGUFTensor]:
    """{original Wan key: GGUFTensor} of a Wan GGUF file, after checking everything the reader will touch."""
    from gguf import GGUFReader

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or damaged GGUF file ({str(exc).splitlines()[0][:160]}); "
                              "download it again") from None
    arch = _string_field(reader, "general.architecture")
    tensors: dict[str, GGUFTensor] = {}
    for info in reader.tensors:
        name = info.name[len(COMFY_PREFIX):] if info.name.startswith(COMFY_PREFIX) else info.name
        qtype = info.tensor_type.name
        if qtype not in BLOCKS:
            raise CheckpointError(f"{path}: tensor {name!r} has GGUF type {qtype}, which wanlite cannot dequantize "
                                  f"(supported: {', '.join(BLOCKS)})")
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))  # ne[0] is the innermost torch dim
        numel = int(np.prod(shape))
        values, block_bytes = BLOCKS[qtype]
        want = numel // values * block_bytes
        if numel % values or int(info.n_bytes) != want:
            raise CheckpointError(f"{path}: tensor {name!r} ({qtype}, shape {shape}) holds {int(info.n_bytes)} "
                                  f"bytes, expected {want}; the file is damaged")
        if int(info.data_offset) + want > size or info.data.nbytes != want:
            raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file "
                                  f"(bytes {int(info.data_offset)}..{int(info.data_offset) + want} of {size}); "
                                  "the download is incomplete")
        orig = _orig_shape(reader, info.name)
        if orig is not None:
            if int(np.prod(orig)) != numel:
                raise CheckpointError(f"{path}: {ORIG_SHAPE_KEY}{info.name} = {orig} does not fit {numel} values")
            shape = orig
        tensors[name] = GGUFTensor(name, qtype, shape, info.data.view(np.uint8))
    if arch != "wan" and not (arch is None and all(k in tensors for k in WAN_KEYS)):
        raise NotWanGGUF(f"{path}: a GGUF for architecture {arch!r}, not a Wan model ('wan'); "
                              "pick a Wan2.2 GGUF (e.g. city96 or QuantStack)")
    return tensors
