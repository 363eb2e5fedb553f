"""One contiguous byte slab per block: its layout, packing a module into it, and binding a module to it.

A block's weights (parameters, buffers, `QLinear` qdata/scale, and the inner tensors of wrapper subclasses
such as torchao's `Int8Tensor` or quanto's `WeightQBytesTensor`) are laid out back to back, each aligned, in
one uint8 tensor. That tensor is what crosses the bus (one copy per block) and what a disk-mode cache file
holds byte for byte. `bind` points the module's tensors at views of a slab wherever it lives (a device ring
buffer, a host slab); `unbind` restores what was there before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wanlite.errors import WanliteError

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorized copies


@dataclass(frozen=True)
class Part:
    """One plain tensor inside a slab."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def view(self, slab: torch.Tensor) -> torch.Tensor:
        return slab[self.offset: self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Slot:
    """A module attribute (`module.leaf`, a parameter or a buffer) and how to rebuild it from slab views.

    A plain tensor has one part; a wrapper subclass has one part per inner tensor plus what
    `__tensor_unflatten__` needs (`ctx`, outer shape and stride)."""

    module: str  # dotted path inside the block ("" for the block itself)
    leaf: str
    is_param: bool
    parts: tuple[tuple[str, Part], ...]  # ("", part) for a plain tensor, (inner name, part) for a subclass
    subclass: type | None = None
    ctx: object = None
    outer: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def build(self, slab: torch.Tensor) -> torch.Tensor:
        if self.subclass is None:
            return self.parts[0][1].view(slab)
        inner = {name: part.view(slab) for name, part in self.parts}
        return self.subclass.__tensor_unflatten__(inner, self.ctx, *self.outer)


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]
    nbytes: int


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _flatten(t: torch.Tensor, where: str) -> tuple[list[tuple[str, torch.Tensor]], type | None, object]:
    if type(t) in (torch.Tensor, nn.Parameter):
        return [("", t)], None, None
    if hasattr(t, "__tensor_flatten__"):
        names, ctx = t.__tensor_flatten__()
        inner = [(n, getattr(t, n)) for n in names]
        if any(type(x) not in (torch.Tensor, nn.Parameter) for _, x in inner):
            raise WanliteError(f"{where}: nested tensor subclasses cannot be block-offloaded; use "
                               "--quant int8 (torchao) or a wanlite / GGUF / fp8 file")
        return inner, type(t), ctx
    raise WanliteError(f"{where} is a {type(t).__name__}, which keeps state outside its tensor data and cannot be "
                       "streamed block by block; use --quant-backend torchao or quanto, or --offload model")


def piece_filter(piece: str | int):
    """Which submodules of a DiT a piece covers: "pre" = everything used before the blocks, "head" = the head,
    block i = the whole block (its layout is relative to the block itself)."""
    if piece == "pre":
        return lambda path: path.split(".")[0] not in ("blocks", "head")
    if piece == "head":
        return lambda path: path.split(".")[0] == "head"
    return lambda path: True


def layout_of(block: nn.Module, covers=lambda path: True) -> Layout:
    """Where every tensor of `block` (in the submodules `covers` accepts) goes in its slab, in `named_modules`
    order so it is deterministic."""
    slots, offset = [], 0
    for path, module in block.named_modules():
        if not covers(path):
            continue
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for leaf, t in table.items():
                if t is None:
                    continue
                inner, subclass, ctx = _flatten(t, f"block tensor {path}.{leaf}")
                parts = []
                for name, x in inner:
                    part = Part(offset, x.dtype, tuple(x.shape))
                    parts.append((name, part))
                    offset = _aligned(offset + part.nbytes)
                outer = None if subclass is None else (tuple(t.shape), tuple(t.stride()))
                slots.append(Slot(path, leaf, is_param, tuple(parts), subclass, ctx, outer))
    return Layout(tuple(slots), offset)


def _module_tensors(block: nn.Module, slot: Slot) -> tuple[nn.Module, dict]:
    module = block.get_submodule(slot.module) if slot.module else block
    return module, (module._parameters if slot.is_param else module._buffers)


def pack(block: nn.Module, layout: Layout, slab: torch.Tensor) -> None:
    """Copy the block's tensors into `slab` (uint8, at least `layout.nbytes`) in layout order."""
    for slot in layout.slots:
        _, table = _module_tensors(block, slot)
        t = table[slot.leaf]
        inner = dict(_flatten(t, slot.leaf)[0])
        for name, part in slot.parts:
            src = inner[name].detach().contiguous()
            part.view(slab).copy_(src.view(part.shape))


def tables(block: nn.Module, layout: Layout) -> list[tuple[dict, str]]:
    """The (parameter or buffer dict, name) each slot of `layout` lives in, resolved once per block."""
    return [(_module_tensors(block, slot)[1], slot.leaf) for slot in layout.slots]


def views(layout: Layout, slab: torch.Tensor) -> list[torch.Tensor]:
    """Every slot of `layout` as a tensor on `slab` (parameters wrapped), ready to assign."""
    return [nn.Parameter(slot.build(slab), requires_grad=False) if slot.is_param else slot.build(slab)
            for slot in layout.slots]


def bind_views(where: list[tuple[dict, str]], tensors: list[torch.Tensor]) -> list:
    """Assign `tensors` into their places; returns what `unbind` needs to restore."""
    saved = []
    for (table, leaf), t in zip(where, tensors):
        saved.append((table, leaf, table[leaf]))
        table[leaf] = t
    return saved


def bind(block: nn.Module, layout: Layout, slab: torch.Tensor) -> list:
    """Point every tensor of `block` at views of `slab`; returns what `unbind` needs to restore."""
    return bind_views(tables(block, layout), views(layout, slab))


def unbind(saved: list) -> None:
    for table, leaf, t in saved:
        table[leaf] = t


def to_meta(block: nn.Module, layout: Layout) -> None:
    """Drop the block's host tensors (its bytes live in a file or a slab now), keeping shapes and dtypes."""
    for slot in layout.slots:
        _, table = _module_tensors(block, slot)
        t = slot.build(torch.empty(layout.nbytes, dtype=torch.uint8, device="meta"))
        table[slot.leaf] = nn.Parameter(t, requires_grad=False) if slot.is_param else t


def pin_or_plain(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host byte buffer, page-locked when asked and the OS allows it (Windows caps pinned memory well below
    RAM; a refusal falls back to pageable memory instead of failing the run)."""
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8), False
