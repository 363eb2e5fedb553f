"""Where a DiT's pieces ("pre", "head", block i) live off the device, one store per host-RAM mode.

- `RamStore` (`pinned`): every piece packed once into its own host slab, page-locked up to a cap (the rest
  pageable: partial pinning), and the model's tensors re-pointed at the slabs so nothing is held twice.
- `FileStore` (`mmap`): nothing of the model stays in process memory; each piece is read from the checkpoint
  (the OS page cache keeps what RAM allows) by a background thread just ahead of use.
- `FileStore` over a `DiskCache` (`disk`): the same, but from per-piece files holding the slab bytes in the
  runtime format, written once and validated by a manifest hash; each file's CRC-32 is checked on its first read
  in a run, and a piece that fails it is read again from the checkpoint and rewritten.

Every store hands out `(layout, host bytes)` and, the first time a file-backed block arrives, the shell module
offload binds device views into.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from wanlite._version import __version__
from wanlite.errors import CheckpointError, WanliteError
from wanlite.offload.slabs import Layout, bind, layout_of, pack, piece_filter, pin_or_plain, to_meta
from wanlite.files import clean_stale, closed, opened, temp_name

Piece = str | int


def pieces(num_blocks: int) -> list[Piece]:
    return ["pre", *range(num_blocks), "head"]


def shell_of(model: nn.Module, piece: Piece) -> nn.Module:
    return model.blocks[piece] if isinstance(piece, int) else model


class PinBudget:
    """How many bytes may still be page-locked (a fraction of RAM; Windows refuses far earlier than Linux)."""

    def __init__(self, limit: int):
        self.left = limit
        self.pinned = self.pageable = 0

    def allocate(self, nbytes: int) -> torch.Tensor:
        want = torch.cuda.is_available() and nbytes <= self.left
        buf, pinned = pin_or_plain(nbytes, want)
        if pinned:
            self.left -= nbytes
            self.pinned += nbytes
        else:
            if want:
                self.left = 0  # the OS said no: stop asking
            self.pageable += nbytes
        return buf


class RamStore:
    """The whole model in host RAM, one slab per piece (`ram_mode=pinned`)."""

    def __init__(self, model: nn.Module, budget: PinBudget):
        self.model = model
        self.layouts: dict[Piece, Layout] = {}
        self.slabs: dict[Piece, torch.Tensor] = {}
        for piece in pieces(len(model.blocks)):
            shell = shell_of(model, piece)
            layout = layout_of(shell, piece_filter(piece))
            slab = budget.allocate(layout.nbytes)
            pack(shell, layout, slab)
            bind(shell, layout, slab)  # the model now reads its weights from the slab; the originals go
            self.layouts[piece], self.slabs[piece] = layout, slab

    def layout(self, piece: Piece) -> Layout | None:
        return self.layouts[piece]

    def prefetch(self, piece: Piece) -> None:
        pass

    def fetch(self, piece: Piece) -> tuple[Layout, torch.Tensor, nn.Module | None]:
        return self.layouts[piece], self.slabs[piece], None

    def release(self, buf: torch.Tensor, after=None) -> None:
        pass

    def close(self) -> None:
        self.slabs.clear()


Reader = Callable[[Piece], nn.Module]


class FileStore:
    """Pieces read on a background thread into a few reusable (pinned when possible) staging buffers, ahead of
    use; at most `staging` pieces are in host memory at once (`ram_mode=mmap` / `disk`)."""

    def __init__(self, model: nn.Module, read_piece: Reader, staging: int, budget: PinBudget,
                 cache: DiskCache | None = None):
        self.model, self.read_piece, self.cache, self.budget = model, read_piece, cache, budget
        self.layouts: dict[Piece, Layout] = {} if cache is None else dict(cache.layouts)
        self.staging = staging
        self.free: list[torch.Tensor] = []
        self.buffers = 0
        self.pending: dict[Piece, Future] = {}
        self.reuse_after: dict[int, object] = {}
        self.lock = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanlite-read")
        self.read_wait_s = 0.0

    def layout(self, piece: Piece) -> Layout | None:
        return self.layouts.get(piece)

    def _read(self, piece: Piece, buf: torch.Tensor | None) -> tuple[Layout, torch.Tensor, nn.Module | None]:
        if self.cache is not None:
            layout = self.layouts[piece]
            buf = buf if buf is not None else self._wait_buffer(layout.nbytes)
            try:
                self.cache.read(piece, buf[: layout.nbytes])
            except CacheDamaged as exc:
                self._repair(piece, layout, buf[: layout.nbytes], exc)
            return layout, buf, None
        module = self.read_piece(piece)
        layout = layout_of(module, piece_filter(piece))
        known = self.layouts.get(piece)
        if known is not None and known != layout:
            raise WanliteError(f"offload: piece {piece} of the checkpoint changed while running; re-run")
        buf = buf if buf is not None else self._wait_buffer(layout.nbytes)
        pack(module, layout, buf)
        shell = None
        if isinstance(piece, int) and known is None:
            to_meta(module, layout)
            shell = module
        return layout, buf, shell

    def _repair(self, piece: Piece, layout: Layout, out: torch.Tensor, damage: CacheDamaged) -> None:
        """A cache file that fails its checksum: the piece again from the checkpoint, into `out` and the file."""
        module = self.read_piece(piece)
        fresh = layout_of(module, piece_filter(piece))
        if _describe(fresh) != _describe(layout) or fresh.nbytes != layout.nbytes:
            raise damage
        pack(module, fresh, out)
        self.cache.rewrite(piece, out)
        warnings.warn(f"{damage}: rebuilt it from the checkpoint", RuntimeWarning, stacklevel=2)

    def _wait_buffer(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            while True:
                buf = self._take_locked(nbytes)
                if buf is not None:
                    return buf
                self.lock.wait()

    def _take_locked(self, nbytes: int) -> torch.Tensor | None:
        for i, buf in enumerate(self.free):
            if buf.numel() >= nbytes:
                return self._ready(self.free.pop(i))
        if self.buffers < self.staging:
            self.buffers += 1
            return self.budget.allocate(nbytes)
        if self.free:
            self._ready(self.free.pop(0))
            return self.budget.allocate(nbytes)
        return None

    def _ready(self, buf: torch.Tensor) -> torch.Tensor:
        event = self.reuse_after.pop(buf.data_ptr(), None)
        if event is not None:
            event.synchronize()  # the device copy out of this buffer must be done before it is overwritten
        return buf

    def prefetch(self, piece: Piece) -> None:
        if piece in self.pending:
            return
        layout = self.layouts.get(piece)
        with self.lock:
            buf = self._take_locked(layout.nbytes) if layout is not None else None
        if layout is not None and buf is None:
            return  # every staging buffer is in use; fetch() reads it when its turn comes
        self.pending[piece] = self.pool.submit(self._read, piece, buf)

    def fetch(self, piece: Piece) -> tuple[Layout, torch.Tensor, nn.Module | None]:
        if piece not in self.pending:
            self._drop_pending()  # reads made for another order would hold the staging buffers this one needs
            self.pending[piece] = self.pool.submit(self._read, piece, None)
        started = time.perf_counter()
        layout, buf, shell = self.pending.pop(piece).result()
        self.read_wait_s += time.perf_counter() - started
        self.layouts[piece] = layout
        return layout, buf, shell

    def _drop_pending(self) -> None:
        for future in self.pending.values():
            self.release(future.result()[1])
        self.pending.clear()

    def release(self, buf: torch.Tensor, after=None) -> None:
        """`buf` (from `fetch`) may be refilled once `after` (a CUDA event, or None) has completed."""
        with self.lock:
            if after is not None:
                self.reuse_after[buf.data_ptr()] = after
            self.free.append(buf)
            self.lock.notify_all()

    def close(self) -> None:
        self._drop_pending()
        self.pool.shutdown(wait=True)
        self.free.clear()


def source_fingerprint(paths: list[Path], extra: dict) -> str:
    """What a disk cache was made from: the checkpoint files (name, size, mtime), the runtime format and
    wanlite's version. Any change gives another hash, so a stale cache is rebuilt, never used."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps({**extra, "wanlite": __version__}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _describe(layout: Layout) -> list:
    return [[s.module, s.leaf, s.is_param, [[n, p.offset, str(p.dtype), list(p.shape)] for n, p in s.parts]]
            for s in layout.slots]


def _shell_spec(block: nn.Module) -> dict:
    """The module swaps quantization made in a block (QLinear attributes), enough to rebuild its shell."""
    from wanlite.quant.base import QLinear

    out = {}
    for path, module in block.named_modules():
        if isinstance(module, QLinear):
            out[path] = {"family": module.family, "qtype": module.qtype, "shape": list(module.weight_shape),
                         "qdata": [str(module.qdata.dtype), list(module.qdata.shape)],
                         "fast_matmul": module.fast_matmul, "scale": None if module.scale is None else
                         [str(module.scale.dtype), list(module.scale.shape)],
                         "bias": None if module.bias is None else str(module.bias.dtype)}
    return out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a dtype: {name}")
    return dtype


def _rebuild_shell(template: nn.Module, spec: dict) -> nn.Module:
    import copy

    from wanlite.quant.base import QLinear, QuantizedWeight, set_submodule

    shell = copy.deepcopy(template)
    meta = torch.device("meta")
    for path, q in spec.items():
        scale = None if q["scale"] is None else torch.empty(q["scale"][1], dtype=_dtype(q["scale"][0]), device=meta)
        qdata = torch.empty(q["qdata"][1], dtype=_dtype(q["qdata"][0]), device=meta)
        weight = QuantizedWeight(q["family"], q["qtype"], tuple(q["shape"]), qdata, scale, q["fast_matmul"])
        bias = None if q["bias"] is None else torch.empty(q["shape"][0], dtype=_dtype(q["bias"]), device=meta)
        set_submodule(shell, path, QLinear(weight, bias))
    return shell


class CacheDamaged(CheckpointError):
    """A disk-cache piece file whose bytes no longer match the CRC-32 written with it."""


class DiskCache:
    """`ram_mode=disk`: one file per piece holding its slab bytes exactly, plus `manifest.json` (layouts, shell
    structure, fingerprint, each file's CRC-32). Written once from the checkpoint, one piece in memory at a time; a
    manifest that does not match the checkpoint's fingerprint means rebuild. A file's CRC-32 is checked on its
    first read in a process (zlib: about 0.1 s for a 300 MB block on one core, on the reading thread, so the
    steps after the first pay nothing); a mismatch raises `CacheDamaged` and drops the manifest, so the cache is
    rebuilt unless the piece is rewritten (`FileStore` does that from the checkpoint)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.layouts: dict[Piece, Layout] = {}
        self.shells: dict[int, dict] = {}
        self.manifest: dict | None = None
        self.checked: set[Piece] = set()

    def path(self, piece: Piece) -> Path:
        return self.folder / (f"block_{piece:03d}.bin" if isinstance(piece, int) else f"{piece}.bin")

    def valid(self, model: nn.Module, template: Callable[[int], nn.Module], all_pieces: list[Piece]) -> bool:
        """True when the manifest was written for this fingerprint, every piece file has its size and every
        layout matches the shell rebuilt from it; the layouts and block shells are then kept."""
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if manifest.get("fingerprint") != self.fingerprint or manifest.get("pieces") != [str(p) for p in all_pieces]:
            return False
        layouts, shells = {}, {}
        for piece in all_pieces:
            entry = manifest["layouts"][str(piece)]
            if not self.path(piece).is_file() or self.path(piece).stat().st_size != entry["nbytes"]:
                return False
            if not isinstance(entry.get("crc32"), int):  # written before checksums: rebuild
                return False
            if isinstance(piece, int):
                shells[piece] = _rebuild_shell(template(piece), entry["shell"])
                layout = layout_of(shells[piece])
            else:
                layout = layout_of(model, piece_filter(piece))
            if _describe(layout) != entry["slots"] or layout.nbytes != entry["nbytes"]:
                return False
            layouts[piece] = layout
        self.layouts, self.shells, self.manifest = layouts, shells, manifest
        return True

    def write(self, read_piece: Reader, all_pieces: list[Piece], progress=None) -> None:
        """Materialize each piece from the checkpoint, write its bytes (temp file + rename), keep its shell."""
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale(self.folder)  # temp files of a run killed while writing
        stale = self.folder / "manifest.json"
        if stale.exists():
            stale.unlink()  # the old manifest goes first: a half-rebuilt cache is never valid
        entries = {}
        for n, piece in enumerate(all_pieces):
            module = read_piece(piece)
            layout = layout_of(module, piece_filter(piece))
            if any(slot.subclass is not None for slot in layout.slots):
                raise WanliteError("--ram_mode disk cannot cache tensor-subclass weights (--quant int8 with torchao/quanto); use --ram_mode mmap, "
                                   "or a file from `wanlite convert --to int8`")
            slab = torch.empty(layout.nbytes, dtype=torch.uint8)
            pack(module, layout, slab)
            crc = self._write_file(piece, slab)
            entries[str(piece)] = {"nbytes": layout.nbytes, "slots": _describe(layout), "crc32": crc,
                                   "shell": _shell_spec(module) if isinstance(piece, int) else {}}
            if isinstance(piece, int):
                to_meta(module, layout)
                self.shells[piece] = module
            self.layouts[piece] = layout
            del slab
            if progress is not None:
                progress(n + 1, len(all_pieces))
        self.manifest = {"fingerprint": self.fingerprint, "pieces": [str(p) for p in all_pieces],
                         "layouts": entries}
        self.checked = set(all_pieces)  # just written from memory
        self._write_manifest()

    def _write_file(self, piece: Piece, slab: torch.Tensor) -> int:
        """`slab`'s bytes as the piece's file (temp file + rename); returns their CRC-32."""
        data = memoryview(slab.numpy())
        crc = zlib.crc32(data)
        tmp = opened(temp_name(self.path(piece)))
        try:
            with tmp.open("wb") as f:
                f.write(data)
            os.replace(tmp, self.path(piece))
        finally:
            tmp.unlink(missing_ok=True)
            closed(tmp)
        return crc

    def _write_manifest(self) -> None:
        tmp = opened(temp_name(self.folder / "manifest.json"))
        try:
            tmp.write_text(json.dumps(self.manifest), encoding="utf-8")
            os.replace(tmp, self.folder / "manifest.json")
        finally:
            tmp.unlink(missing_ok=True)
            closed(tmp)

    def read(self, piece: Piece, out: torch.Tensor) -> None:
        with self.path(piece).open("rb") as f:
            got = f.readinto(memoryview(out.numpy()))
        if got != out.numel():
            raise WanliteError(f"{self.path(piece)}: the offload cache file is truncated; delete {self.folder} "
                               "and run again to rebuild it")
        if piece in self.checked:
            return
        want = self.manifest["layouts"][str(piece)]["crc32"] if self.manifest is not None else None
        if want is not None and zlib.crc32(memoryview(out.numpy())) != want:
            (self.folder / "manifest.json").unlink(missing_ok=True)  # the next run rebuilds the cache
            raise CacheDamaged(f"{self.path(piece)}: the offload cache file fails its checksum (changed on disk "
                               "since it was written); the cache is rebuilt on the next run")
        self.checked.add(piece)

    def rewrite(self, piece: Piece, slab: torch.Tensor) -> None:
        """Replace a damaged piece file with `slab` (the same bytes, from the checkpoint) and restore the
        manifest `read` dropped."""
        crc = self._write_file(piece, slab)
        if crc != self.manifest["layouts"][str(piece)]["crc32"]:
            raise CacheDamaged(f"{self.path(piece)}: the piece read again from the checkpoint differs from the "
                               f"cached one; delete {self.folder} and run again to rebuild it")
        self._write_manifest()
        self.checked.add(piece)
