"""Measure the bytes of live tensors an operation sequence allocates, on any device (CPU, meta, CUDA).

`LiveBytes` is a dispatch mode that counts every new tensor storage when an op creates it and uncounts it when
the last reference dies, so `peak` is the high-water mark of activation memory (what a caching allocator holds
at least), without the allocator's rounding or fragmentation. The planner's formulas are validated against it.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return  # a view of something already counted
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # outputs sharing an input's storage are views (or in-place results): nothing new was allocated
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out
