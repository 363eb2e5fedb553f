"""Write checkpoints in the real on-disk layouts: every file lands under a temporary name and is renamed when
complete, so an interrupted write never leaves a file that looks valid."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_pth(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def write_shards(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int = 2):
    """Split into `stem-0000k-of-0000n.safetensors` plus the `.index.json` the HF loaders read."""
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_safetensors(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / f"{stem}.safetensors.index.json")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                      torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time (the header is known up front from the planned names,
    dtypes and shapes), so a 14B conversion never holds the whole output in RAM. Use as a context manager:
    the file appears under its final name only after the last tensor was written."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected = []
        for name, dtype, shape in plan:
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        self.header = raw + b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.index = 0

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.tmp.open("wb")
        self.file.write(len(self.header).to_bytes(8, "little"))
        self.file.write(self.header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.index]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise ValueError(f"tensor {self.index} is {got}, but the header promised {want}")
        self.file.write(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.index += 1

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None and self.index == len(self.expected):
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
