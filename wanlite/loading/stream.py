"""Stream checkpoint tensors one at a time into a model built on the `meta` device.

A tensor source maps raw checkpoint keys to shapes and fills a destination tensor on request; `load_into`
renames keys, checks every shape before reading a byte, allocates each parameter in its final dtype and
fills it in place, so no full-precision copy of the model ever exists in RAM.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import os
import stat
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from wanlite.errors import CheckpointError
from wanlite.loading.progress import tensor_quantized, tensor_read
from wanlite.files import regular_file_size
from wanlite.loading.safetensors_file import SafetensorsFile
from wanlite.quant.base import DenseConfig, QuantConfig, build_linear, set_submodule, targets_linear

PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class SafetensorsSource:
    """One or more safetensors shards seen as one key space (a sharded checkpoint or a single file)."""

    def __init__(self, files: Iterable[Path]):
        self.files = [SafetensorsFile(p) for p in files]
        self.owner: dict[str, SafetensorsFile] = {}
        for shard in self.files:
            for key in shard.keys():
                if key in self.owner:
                    raise CheckpointError(f"{shard.path}: tensor {key!r} also appears in {self.owner[key].path}")
                self.owner[key] = shard

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.files]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.info(k).shape for k, s in self.owner.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: s.info(k).dtype for k, s in self.owner.items()}

    def formats(self) -> dict[str, str]:
        """How each tensor is stored, for `wanlite check` ("bfloat16", "float8_e4m3fn", "Q4_K", ...)."""
        return {k: str(s.info(k).dtype).replace("torch.", "") for k, s in self.owner.items()}

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for shard in self.files:
            merged.update(shard.metadata)
        return merged

    def fill(self, plan: list[tuple[str, torch.Size, torch.dtype]], transient: frozenset[str] = frozenset()):
        """Read each (key, shape, dtype) into a fresh tensor, shard by shard, in file order for sequential
        reads; the next tensor is read on a worker thread while the caller works on this one (file reads and
        torch ops release the GIL). A tensor is not kept here: a caller that quantizes it and lets it go holds
        one source tensor at a time. Keys in `transient` (weights the caller is done with before it asks for
        the next tensor) are read into one of two reused buffers instead, so no fresh pages are faulted in for
        them: on this path page faults cost as much as the read itself."""
        index = {id(s): i for i, s in enumerate(self.files)}
        def file_order(item):
            shard = self.owner[item[0]]
            return index[id(shard)], shard.info(item[0]).begin

        order = sorted(plan, key=file_order)
        sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in order]
        slot_bytes = max((n for (key, _, _), n in zip(order, sizes) if key in transient), default=0)
        slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(2 if slot_bytes else 0)]

        def read(i: int):
            key, shape, dtype = order[i]
            # item i and item i + 1 (being read meanwhile) are the only ones alive: alternate the two slots
            out = slots[i % 2][:sizes[i]].view(dtype).view(shape) if key in transient else \
                torch.empty(shape, dtype=dtype)
            return key, self.owner[key].read_into(key, out)

        with contextlib.ExitStack() as stack:
            for shard in {id(self.owner[key]): self.owner[key] for key, _, _ in order}.values():
                stack.enter_context(shard)
            yield from read_ahead(read, len(order))


def read_ahead(read: Callable[[int], tuple], count: int):
    """Yield read(0) .. read(count - 1), running read(i + 1) on a worker thread while the caller holds read(i)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0) if count else None
        for i in range(count):
            got = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < count else None
            yield got
            del got


class PthSource:
    """A `.pth` state dict opened with `torch.load(weights_only=True, mmap=True)`: no code runs, no full read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.paths = [self.path]
        regular_file_size(self.path)
        try:
            with warnings.catch_warnings():  # a damaged file's odd pickle protocol is reported below, once
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 -- the restricted unpickler's boundary: a damaged pickle
            # raises anything (UnpicklingError, KeyError, IndexError, struct.error, RuntimeError, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{self.path}: not a plain tensor state dict ({first[:160]}); wanlite loads .pth files "
                "only with torch.load(weights_only=True), get the file from the official release") from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and set(obj) == {wrapper}:
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not obj:
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and type(v) in (torch.Tensor, nn.Parameter))]
        if bad:
            raise CheckpointError(
                f"{self.path}: entry {str(bad[0])[:80]!r} is not a tensor; expected a dict of tensors (a state dict)")
        odd = [k for k, v in obj.items() if v.layout != torch.strided or v.is_quantized or v.is_complex()]
        if odd:
            raise CheckpointError(f"{self.path}: tensor {odd[0]!r} is sparse, quantized or complex; a Wan "
                                  "checkpoint holds plain dense tensors")
        self.tensors: dict[str, torch.Tensor] = obj

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.tensors.items()}

    def formats(self) -> dict[str, str]:
        return {k: str(v.dtype).replace("torch.", "") for k, v in self.tensors.items()}

    def metadata(self) -> dict[str, str]:
        return {}

    def fill(self, plan: list[tuple[str, torch.Size, torch.dtype]]):
        for key, shape, dtype in plan:
            stored = self.tensors[key]
            copy = stored.to(dtype, copy=True).reshape(shape)  # off the mmap
            drop_mapped_pages(stored)
            yield key, copy


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Take a memory-mapped tensor's pages out of this process's resident set once it has been copied: mapped
    pages that were read count in RSS until the whole file is unmapped, so loading the 11.4 GB umT5 `.pth`
    into fp8 would otherwise peak at both (bench/results/stage_memory.json). The pages stay in the OS page
    cache and are read again if touched (the mapping is private and never written). Where the OS has no
    madvise (Windows) this does nothing."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _safetensors_layout(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then the header's opening '{'."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def sniff(path: Path) -> str | None:
    """A weight file's container from its structure: "gguf" (magic), "pth" (a zip, or a pickle's protocol
    opcode 0x80 + 2..5 that is not also a valid safetensors header length), "safetensors"; None for anything
    else, and for a pipe, device or folder (never opened: opening a FIFO blocks)."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    # before the zip and pickle signatures: a header of 128 + 256k bytes starts with 0x80 too, one of 67 MB with
    # "PK\x03\x04"; neither a zip nor a pickle has a '{' where a fitting header length puts it
    if _safetensors_layout(head, info.st_size):
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "pth"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pth"
    # unrecognised bytes: trust the suffix so the container's own reader says what is wrong with the file
    return {".pth": "pth", ".pt": "pth", ".gguf": "gguf", ".safetensors": "safetensors"}.get(path.suffix)


def open_source(paths: list[Path]):
    """Open a checkpoint component by file content (safetensors shards, one GGUF, or one .pth); fp8 / int8
    safetensors come back as a source that hides their scale tensors."""
    paths = [Path(p) for p in paths]
    for p in paths:
        regular_file_size(p)  # a FIFO or device stops here with one line, before anything opens it
    kinds = {sniff(p) for p in paths}
    if kinds == {"gguf"} and len(paths) == 1:
        from wanlite.quant.gguf import GGUFSource

        return GGUFSource(paths[0])
    if kinds == {"pth"} and len(paths) == 1:
        return PthSource(paths[0])
    if kinds == {"safetensors"}:
        from wanlite.loading.scaled_file import ScaledSafetensorsSource, is_scaled

        source = SafetensorsSource(paths)
        return ScaledSafetensorsSource(paths) if is_scaled(source) else source
    raise CheckpointError(f"{paths[0]}: not a safetensors, GGUF or PyTorch weight file (or a mix of them); "
                          "check the file is complete")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


def check_against(
    model: nn.Module,
    source: SafetensorsSource | PthSource,
    rename: Callable[[str], str | None],
    what: str,
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Match a checkpoint against a meta-built `model` without reading tensor data: every key known, every
    shape right, nothing missing. Returns the (checkpoint key, state-dict name) pairs and the tied aliases."""
    expected: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied weights (umT5's embed_tokens is `shared`): load once, share after
    canonical_of: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in canonical_of:
            aliases[name] = canonical_of[id(t)]
        else:
            canonical_of[id(t)] = name
            expected[name] = t
    where = source.paths[0] if len(source.paths) == 1 else source.paths[0].parent
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, shape in source.shapes().items():
        name = rename(key)
        if name is None:
            continue
        name = aliases.get(name, name)
        if name not in expected:
            raise CheckpointError(f"{where}: tensor {key!r} is not part of a {what}; is this the right file?")
        if name in seen:
            if name in aliases.values():  # both names of a tied weight were stored
                continue
            raise CheckpointError(f"{where}: tensor {name!r} appears twice")
        seen.add(name)
        want = tuple(expected[name].shape)
        if tuple(shape) != want:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(shape)} but a {what} needs {want}; "
                "the checkpoint belongs to another model")
        pairs.append((key, name))
    missing = [n for n in expected if n not in seen]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors of the {what} are missing (first: {missing[0]!r}); "
            "the checkpoint is incomplete or for another model")
    return pairs, aliases


def load_into(
    model: nn.Module,
    source,
    rename: Callable[[str], str | None],
    dtype_for: Callable[[str, torch.dtype], torch.dtype],
    what: str,
    quant: QuantConfig | None = None,
    lora=None,
) -> nn.Module:
    """Materialize `model` (built on meta) from `source`; `rename` maps a checkpoint key to a state-dict name
    (None drops it); `dtype_for(name, stored_dtype)` picks each parameter's dtype. Everything is checked
    (`check_against`) before the first byte of tensor data is read.

    Quantizable Linears (the shared high-precision rule) are swapped once their weight and bias have arrived:
    `quant=None` keeps pre-quantized weights as stored (fp8, int8, GGUF) and the rest dense, `DenseConfig`
    dequantizes everything, any other config quantizes each weight as it arrives, so peak memory stays near
    the quantized size."""
    pairs, aliases = check_against(model, source, rename, what)
    return load_pairs(model, source, pairs, aliases, dtype_for, quant, lora)


def load_pairs(model: nn.Module, source, pairs: list[tuple[str, str]], aliases: dict[str, str],
               dtype_for: Callable[[str, torch.dtype], torch.dtype], quant: QuantConfig | None = None,
               lora=None) -> nn.Module:
    """`load_into` after the check: read the checked (checkpoint key, state-dict name) `pairs` into `model`
    (which may hold only part of the network, e.g. one block, under the same names). `lora` (a
    wanlite.lora.LoraSet) merges into each Linear weight on its way in,
    before quantization; a pre-quantized weight is merged only when asked (mode "merge": dequantize, merge,
    quantize again to the stored format)."""
    meta = model.state_dict(keep_vars=True)
    stored_dtypes = source.dtypes()
    prequantized = source.quantized_keys() if hasattr(source, "quantized_keys") else set()
    modules = dict(model.named_modules())
    names = dict(pairs)
    targets: dict[str, int] = {}  # Linear module -> tensors it waits for (weight, bias)
    for key, name in pairs:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not targets_linear(module_name, module):
            continue
        if (key in prequantized) if quant is None else not isinstance(quant, DenseConfig):
            targets[module_name] = 1 + (module.bias is not None)
    arrived: dict[str, dict] = {}

    lora_targets = set() if lora is None else lora.targets()
    requant: dict[str, QuantConfig] = {}

    def merge(module_name: str, value):
        if lora is None or module_name not in lora_targets:
            return value
        if isinstance(value, torch.Tensor):
            return lora.merged(module_name, value)
        from wanlite.quant import config_for_stored

        config = lora.mode == "merge" and config_for_stored(value)
        if not config:
            return value  # stays as stored; LoraSet.attach gives the layer a runtime branch
        requant[module_name] = config
        return lora.merged(module_name, value.dequantize(torch.float32))

    def place(name: str, value, reused: bool = False) -> None:
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight":
            value = merge(module_name, value)
        if module_name in targets:
            got = arrived.setdefault(module_name, {})
            got[leaf] = value
            if len(got) == targets[module_name]:
                compute = dtype_for(module_name + ".weight", torch.bfloat16)
                started = time.perf_counter()
                set_submodule(model, module_name, build_linear(requant.pop(module_name, quant), got["weight"],
                                                               got.get("bias"), compute))
                if isinstance(got["weight"], torch.Tensor):
                    tensor_quantized(got["weight"].nbytes, time.perf_counter() - started)
                del arrived[module_name]
            elif reused:  # its bias comes later in the file: the read buffer is needed again before then
                got[leaf] = value.clone()
            return
        owner, leaf = _owner(model, name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value

    destinations = []
    for key, name in pairs:
        if key in prequantized and name.rpartition(".")[0] in targets:
            value = source.read_quantized(key)
            tensor_read(value.qdata.nbytes)
            place(name, value)
            continue
        meta_t = meta[name]
        dtype = dtype_for(name, stored_dtypes[key]) if meta_t.dtype.is_floating_point else meta_t.dtype
        destinations.append((key, meta_t.shape, dtype))
    # weights whose quantizer keeps no reference to them can be read into a reused buffer (see `fill`)
    transient = frozenset(key for key, name in pairs if name.endswith(".weight") and name.rpartition(".")[0] in
                          targets and getattr(quant, "drops_input", False))
    # (a source that overrides `fill`, e.g. the fp8-scaled one, reads fresh tensors)
    reads = source.fill(destinations, transient) if type(source).fill is SafetensorsSource.fill else \
        source.fill(destinations)
    for key, tensor in reads:
        stored = stored_dtypes[key]
        tensor_read(tensor.numel() * (stored.itemsize if isinstance(stored, torch.dtype) else tensor.element_size()))
        place(names[key], tensor, key in transient)
        del tensor  # a quantized weight's source copy goes now, not at the end of the load
    for alias, name in aliases.items():
        if name not in names.values():
            continue
        alias_owner, alias_leaf = _owner(model, alias)
        owner, leaf = _owner(model, name)
        alias_owner._parameters[alias_leaf] = owner._parameters[leaf]
    return model
