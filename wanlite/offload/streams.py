"""The stream/event API the offload engine orders its copies with, chosen when the engine is built.

`OffloadEngine` is written once against `Streams`, the part of `torch.cuda` it needs. `CudaStreams` is that API
on a GPU; `HostStreams` serves a host "device", where a copy is a memcpy done on the spot and so nothing needs
ordering; tests pass `wanlite.testing.stream_emulator.StreamEmulator`, which runs the copies late on purpose.
"""
from __future__ import annotations

import contextlib
import time
from typing import Protocol

import torch


class Streams(Protocol):
    """A stream has `wait_event(event)` and `synchronize()`; an event has `record(stream)`, `synchronize()` and
    `elapsed_time(end)` (milliseconds, for events made with `timing=True`)."""

    def stream(self): ...  # a new stream for copies

    def current_stream(self): ...  # the stream compute runs on

    def use(self, stream) -> contextlib.AbstractContextManager: ...  # make `stream` current inside the block

    def event(self, timing: bool = False): ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        """`dst.copy_(src)` on the current stream, asynchronously where possible; returns the seconds the
        calling thread spent on it (compute's wait for an asynchronous copy is timed with events instead)."""


class CudaStreams:
    def __init__(self, device: torch.device):
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        dst.copy_(src, non_blocking=True)
        return 0.0


class HostEvent:
    """Host work is done when it is issued, so an event is complete once recorded; it keeps the time."""

    at = 0.0

    def record(self, stream) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.at - self.at) * 1000


class HostStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostStreams:
    def __init__(self):
        self.main = HostStream()

    def stream(self):
        return self.main

    def current_stream(self):
        return self.main

    def use(self, stream):
        return contextlib.nullcontext()

    def event(self, timing: bool = False):
        return HostEvent()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        started = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - started  # the copy blocks compute for exactly this long


def streams_for(device: torch.device) -> Streams:
    return CudaStreams(device) if device.type == "cuda" else HostStreams()
