"""Bytes read while a component loads, for a progress display: `with reading(what, files, emit): load(...)`.

The tensor loader reports each tensor it materializes (`tensor_read`); whoever loads a component says what it
is and how large its files are. Events: {"event": "load", "what", "done", "total", "seconds"} at most every
0.2 s while reading, and one {"event": "loaded", "what", "bytes", "seconds"} at the end; a load that quantized
weights on the way in (`tensor_quantized`) adds "quantized_bytes" (their dense size), "quantize_seconds" and
"quantize_MBps" to it, the encoder's own speed apart from the reads.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_reader: contextvars.ContextVar = contextvars.ContextVar("wanlite_load_progress", default=None)


class _Reading:
    def __init__(self, what: str, total: int, emit: Callable[[dict], None]):
        self.what, self.total, self.emit = what, total, emit
        self.done, self.started, self.shown = 0, time.perf_counter(), 0.0
        self.quantized, self.quantize_seconds = 0, 0.0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.shown >= 0.2:
            self.shown = now
            self.emit({"event": "load", "what": self.what, "done": min(self.done, self.total), "total": self.total,
                       "seconds": now - self.started})


@contextmanager
def reading(what: str, files, emit: Callable[[dict], None]) -> Iterator[None]:
    """Report the tensors loaded inside the block as `what`, against the size of `files` on disk."""
    state = _Reading(what, sum(Path(f).stat().st_size for f in files), emit)
    token = _reader.set(state)
    try:
        yield
    finally:
        _reader.reset(token)
    event = {"event": "loaded", "what": what, "bytes": state.done, "seconds": time.perf_counter() - state.started}
    if state.quantized:
        event.update(quantized_bytes=state.quantized, quantize_seconds=state.quantize_seconds,
                     quantize_MBps=state.quantized / max(state.quantize_seconds, 1e-9) / 1e6)
    emit(event)


def tensor_read(nbytes: int) -> None:
    """Called by the loader for each tensor it has read (its size as stored)."""
    state = _reader.get()
    if state is not None:
        state.add(nbytes)


def tensor_quantized(nbytes: int, seconds: float) -> None:
    """Called by the loader for each weight it quantized on the way in (its dense size, the encoder's time)."""
    state = _reader.get()
    if state is not None:
        state.quantized += nbytes
        state.quantize_seconds += seconds
