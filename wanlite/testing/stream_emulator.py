"""A stand-in for the CUDA stream/event API that makes the offload engine's ordering bugs show up on a CPU.

`OffloadEngine(..., streams=StreamEmulator(seed))` runs the engine's stream code unchanged. The emulator:
- runs the compute stream on the calling thread: its work is done when issued, so its events fire when
  recorded, and waiting there for a copy stream's event blocks the caller until that event fired;
- runs each copy stream on a worker thread, in order, every copy after a random delay drawn from `seed` (often
  short, now and then longer than several blocks' compute; cut short once someone waits for a later event of
  that stream, so correct code is not slowed down); its events fire when the worker passes them;
- fills a copy's destination with 0xFF bytes (NaN in every float format) when the copy is issued and writes
  the real bytes only when the worker runs it: compute that reads a buffer before waiting for its copy's
  event reads garbage (read before the copy landed);
- reads a copy's source only when the worker runs it: host memory refilled before the copy's event fired (a
  staging buffer reused too early) is copied as the wrong bytes;
- raises `StreamHazard` when a copy overwrites memory whose last copy the compute stream waited for, unless
  the copying stream waited for a compute event recorded after that wait (or the host synchronized on one).
  A GPU runs behind the host, so compute may still be reading that memory; here compute is synchronous and
  the overwrite itself would go unnoticed, hence the check (buffer reused before its last reader finished).
Compute is taken to read a copy's destination once it waited for the copy's own event (the first one recorded
after it on its stream); copies go host -> device.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


class StreamHazard(AssertionError):
    """A copy overwrites memory the compute stream may still be reading."""


class Event:
    def __init__(self):
        self.stream = None  # where it was last recorded; never recorded: waiting on it does nothing
        self.mark = 0  # compute stream: its sequence number; copy stream: how many copies precede it
        self.first = 0  # copy stream: the first of the copies it is the own event of (first..mark)
        self.fired: Future | None = None  # copy stream: done when the worker passed it
        self.at = 0.0  # when it fired (perf_counter)

    def record(self, stream) -> None:
        stream.record(self)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.wait_for(self)

    def elapsed_time(self, end: "Event") -> float:
        return (end.at - self.at) * 1000


@dataclass
class Region:
    """The bytes [start, end) that copy number `index` of `stream` writes."""

    start: int
    end: int
    stream: "CopyStream"
    index: int
    read_from: int | None = None  # the compute sequence number when compute waited for this copy


class ComputeStream:
    def __init__(self, emulator: "StreamEmulator"):
        self.emulator = emulator
        self.ticks = 0  # compute events recorded (and host synchronizations)

    def record(self, event: Event) -> None:
        self.ticks += 1
        event.stream, event.mark, event.fired, event.at = self, self.ticks, None, time.perf_counter()

    def wait_event(self, event: Event) -> None:
        if isinstance(event.stream, CopyStream):
            event.stream.wait_for(event)
            self.emulator.seen_by_compute(event, self.ticks)

    def synchronize(self) -> None:
        self.ticks += 1  # reads issued after this point need a later event again
        self.emulator.host_known = self.ticks

    def wait_for(self, event: Event) -> None:
        self.emulator.host_known = max(self.emulator.host_known, event.mark)


class CopyStream:
    def __init__(self, emulator: "StreamEmulator"):
        self.emulator = emulator
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-emulator")
        self.issued = 0
        self.recorded = 0  # copies followed by an event
        self.known = 0  # the latest compute event this stream waited for
        self.error: BaseException | None = None
        self.demand = threading.Condition()
        self.demanded = 0  # copies someone waits for: those run without their delay

    def record(self, event: Event) -> None:
        event.stream, event.first, event.mark = self, self.recorded + 1, self.issued
        self.recorded = self.issued
        event.fired = self.worker.submit(self._fire, event)

    def _fire(self, event: Event) -> None:
        if self.error is not None:
            raise self.error  # a failed copy surfaces where its event is waited for
        event.at = time.perf_counter()

    def wait_event(self, event: Event) -> None:
        if isinstance(event.stream, ComputeStream):
            self.known = max(self.known, event.mark)  # compute work is done once issued: nothing to wait for
        elif event.stream is not None:
            self.worker.submit(event.stream.wait_for, event)

    def synchronize(self) -> None:
        event = Event()
        self.record(event)
        event.synchronize()

    def wait_for(self, event: Event) -> None:
        with self.demand:
            self.demanded = max(self.demanded, event.mark)
            self.demand.notify_all()
        event.fired.result()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, delay: float) -> None:
        self.issued += 1
        self.worker.submit(self._copy, dst, src, delay, self.issued)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, delay: float, index: int) -> None:
        with self.demand:
            self.demand.wait_for(lambda: self.demanded >= index, timeout=delay)
        try:
            dst.copy_(src)
        except Exception as exc:
            self.error = exc


class StreamEmulator:
    """The `Streams` API (wanlite.offload.streams) with asynchronous, randomly late copies; see the module
    docstring. `max_delay_s` bounds one copy's delay; `rng` may be reseeded between generations."""

    def __init__(self, seed: int, max_delay_s: float = 0.05):
        self.rng = random.Random(seed)
        self.max_delay_s = max_delay_s
        self.compute = ComputeStream(self)
        self.current = self.compute
        self.host_known = 0  # the latest compute event the host synchronized on
        self.regions: list[Region] = []

    def stream(self) -> CopyStream:
        return CopyStream(self)

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def use(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def event(self, timing: bool = False) -> Event:
        return Event()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        stream = self.current
        assert isinstance(stream, CopyStream), "the emulator copies on copy streams (host -> device) only"
        start = dst.data_ptr()
        end = start + dst.nbytes
        known = max(stream.known, self.host_known)
        for r in self.regions:
            if r.start < end and start < r.end and r.read_from is not None and known <= r.read_from:
                raise StreamHazard(f"a copy overwrites {end - start} bytes that compute waited for at its event "
                                   f"{r.read_from} and may still be reading; the copy stream waited for no later "
                                   f"compute event (latest: {known})")
        self.regions = [r for r in self.regions if not (r.start < end and start < r.end)]
        dst.view(torch.uint8).fill_(0xFF)
        # long (until waited for) 30% of the time, else short: the worker is sometimes ahead of compute, sometimes not
        delay = self.max_delay_s * (1.0 if self.rng.random() < 0.3 else self.rng.random() * 0.02)
        stream.copy(dst, src, delay)
        self.regions.append(Region(start, end, stream, stream.issued))
        return 0.0

    def seen_by_compute(self, event: Event, tick: int) -> None:
        """Compute waited for `event`: it may read what the event's own copies wrote from now on."""
        for r in self.regions:
            if r.stream is event.stream and event.first <= r.index <= event.mark and r.read_from is None:
                r.read_from = tick
