"""The block-streaming engine: fixed device buffers, a copy stream ahead of the compute stream, and the MoE
expert switch prepared during the previous expert's last forward.

Device memory is fixed for the whole run and shared by the experts: one buffer for the pre-block weights
("pre"), one for the head, one per resident block (the first `k`) and a ring of `d + 1` buffers that the other
blocks stream through. Every forward is one CFG batch (cond + uncond), so each block crosses the bus once per
step. The order of all blocks of all forwards is known from the expert schedule, so the copy stream runs up to
`d` blocks ahead, across forward and expert boundaries; when the next forward belongs to the other expert, its
"pre" weights and resident blocks are copied into their buffers as soon as the current expert is done with
them. Only the head (a few hundred KB) is copied at the switch itself.

Copies run on their own stream (from pinned host memory on CUDA) and are ordered with events, never a
device-wide synchronize. The stream API comes from a `Streams` object chosen when the engine is built
(wanlite.offload.streams): CUDA's, the host's (every "copy" is a memcpy into the buffer, done at once) or a
test's emulator; the engine's code is the same for all of them.

A step cache (wanlite.cache) runs a forward as block ranges and tells the engine ahead which blocks will run
(`ExpertRunner.expect`): blocks a cached step skips are never copied, and the prefetcher stops at a block whose
fate is still undecided instead of spending bandwidth on it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from wanlite.offload.slabs import Layout, layout_of, piece_filter, tables, unbind, views
from wanlite.offload.stores import Piece, RamStore, shell_of
from wanlite.offload.streams import Streams, streams_for


@dataclass
class Telemetry:
    """What offload cost in one generation (shown by `wanlite generate`, written into the mp4 metadata)."""

    bytes_moved: int = 0  # host -> device, all pieces
    bytes_not_moved: int = 0  # streamed blocks a step cache skipped, so they never crossed the bus
    copy_wait_s: float = 0.0  # compute waiting for a transfer to land
    read_wait_s: float = 0.0  # the host waiting for a piece to be read from disk / page cache
    switch_stall_s: float = 0.0  # compute waiting at the expert switch (part of copy_wait_s)
    peak_device_bytes: int = 0
    peak_rss_bytes: int = 0
    pinned_bytes: int = 0
    pageable_bytes: int = 0

    def sample(self, device: torch.device | None = None) -> None:
        """Fold the current RSS (and the device's allocation peak) into the peaks."""
        from wanlite.offload.memory import rss_bytes

        self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes())
        if device is not None and torch.device(device).type == "cuda":
            self.peak_device_bytes = max(self.peak_device_bytes, torch.cuda.max_memory_allocated(device))

    def to_dict(self) -> dict:
        gb = 1e9
        return {"bytes_moved_gb": round(self.bytes_moved / gb, 3),
                "bytes_not_moved_gb": round(self.bytes_not_moved / gb, 3), "copy_wait_s": round(self.copy_wait_s, 3),
                "read_wait_s": round(self.read_wait_s, 3), "switch_stall_s": round(self.switch_stall_s, 3),
                "peak_device_gb": round(self.peak_device_bytes / gb, 3),
                "peak_rss_gb": round(self.peak_rss_bytes / gb, 3),
                "pinned_gb": round(self.pinned_bytes / gb, 3), "pageable_gb": round(self.pageable_bytes / gb, 3)}


class Buffer:
    """A device byte buffer plus the events that order its reuse: `loaded` (its copy landed) and `free` (the
    last computation reading it finished)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.data = torch.empty(0, dtype=torch.uint8, device=device)
        self.loaded = self.free = None
        self.cached_views: dict[int, tuple[Layout, list]] = {}  # id(layout) -> its tensors on this buffer

    def reserve(self, nbytes: int) -> torch.Tensor:
        if self.data.numel() < nbytes:
            if self.free is not None:
                self.free.synchronize()  # the old allocation may still be read by queued kernels
            self.cached_views.clear()
            self.data = torch.empty(0, dtype=torch.uint8, device=self.device)
            self.data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.data

    def views(self, layout: Layout) -> list:
        """The layout's tensors on this buffer, built once: binding a block is then only dict assignments."""
        hit = self.cached_views.get(id(layout))
        if hit is None or hit[0] is not layout:
            hit = self.cached_views[id(layout)] = (layout, views(layout, self.data))
        return hit[1]


@dataclass
class Expert:
    model: nn.Module  # the WanDiT whose pieces are bound to device buffers while it is active
    store: object  # RamStore | FileStore
    homes: dict = field(default_factory=dict)  # (id(shell), id(layout)) -> its own tensors, restored on release


# (forwards ahead of the current one, block) -> will that block run? None: not decided yet (do not prefetch)
Oracle = Callable[[int, int], "bool | None"]


class ExpertRunner:
    """`WanDiT.runner` for one expert: the engine's block loop over `blocks[start:stop]`."""

    def __init__(self, engine: "OffloadEngine", role: str):
        self.engine, self.role = engine, role

    def __call__(self, blocks, x: torch.Tensor, inputs, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.engine.run_blocks(self.role, blocks, x, inputs, start, stop)

    def expect(self, oracle: Oracle | None) -> None:
        """Let a step cache say which blocks will run, so only those are prefetched."""
        self.engine.oracle = oracle


class OffloadEngine:
    """Streams the experts' blocks through fixed device buffers. `activate(role)` makes an expert ready (its
    pre/head/resident pieces bound) and the expert's `runner` streams the rest."""

    def __init__(self, experts: dict[str, Expert], device: torch.device, resident: int, prefetch: int,
                 telemetry: Telemetry | None = None, copy_on_host: bool = False, streams: Streams | None = None):
        self.experts, self.device = experts, torch.device(device)
        # When the device is the host and the weights are in RAM slabs, the slabs are already where the
        # computation reads: nothing is copied unless asked (tests and the overhead bench force the copies).
        self.in_place = {role: self.device.type == "cpu" and isinstance(e.store, RamStore) and not copy_on_host
                         for role, e in experts.items()}
        self.num_blocks = len(next(iter(experts.values())).model.blocks)
        self.resident = max(0, min(resident, self.num_blocks))
        self.depth = max(0, prefetch)
        self.telemetry = telemetry or Telemetry()
        self.streams = streams if streams is not None else streams_for(self.device)
        self.copy_stream = self.streams.stream()
        self.pre, self.head = Buffer(self.device), Buffer(self.device)
        self.resident_bufs = [Buffer(self.device) for _ in range(self.resident)]
        self.ring = [Buffer(self.device) for _ in range(self.depth + 1)]
        self.next_ring = 0
        self.queue: deque = deque()  # ((forward, block), ring buffer) copies issued ahead of compute, in order
        self.cursor = (0, self.resident - 1)  # the last (forward, block) issued to the ring
        self.forward = 0
        self.in_forward = False
        self.ran: set[int] = set()  # streamed blocks run in the current forward
        self.oracle: Oracle | None = None
        self.schedule: list[str] | None = None
        self.active: str | None = None
        self.preloaded: set[tuple[str, Piece]] = set()
        self.stall_events: list = []  # (before, after) timing event pairs around each wait for a copy
        self.switch_events: list = []
        self.places: dict = {}  # (id(shell), id(layout)) -> where each slot's tensor lives in the shell
        self.plain_runners = {role: expert.model.runner for role, expert in experts.items()}
        for role, expert in experts.items():
            expert.model.runner = ExpertRunner(self, role)

    # ---------------------------------------------------------------- ordering
    def set_schedule(self, roles: list[str]) -> None:
        """The expert of every forward of the coming generation (from `Denoiser.schedule()`)."""
        self.schedule, self.forward = list(roles), 0
        self._reset_queue()

    @property
    def streamed(self) -> int:
        return self.num_blocks - self.resident

    def _role_of(self, n: int) -> str | None:
        if self.schedule is None:
            return self.active
        return self.schedule[n] if n < len(self.schedule) else None

    def _next_block(self, after: tuple[int, int]) -> tuple[int, int] | None:
        """The streamed (forward, block) that runs next after `after`: at most one forward ahead (one switch),
        skipping blocks the oracle says will not run; None past the schedule or at an undecided block."""
        if self.streamed == 0:
            return None
        n, i = after
        while True:
            i += 1
            if i >= self.num_blocks:
                n, i = n + 1, self.resident
            i = max(i, self.resident)
            if n > self.forward + 1 or self._role_of(n) is None:
                return None
            runs = True if self.oracle is None else self.oracle(n - self.forward, i)
            if runs is None:
                return None
            if runs:
                return n, i

    def _reset_queue(self) -> None:
        self.copy_stream.synchronize()  # only the copy stream: drop copies no one will read
        for _, buf in self.queue:
            buf.loaded = None
        self.queue.clear()
        self.cursor = (self.forward, self.resident - 1)

    def _issue(self, item: tuple[int, int]) -> None:
        buf = self.ring[self.next_ring]
        self.next_ring = (self.next_ring + 1) % len(self.ring)
        self._copy(self._role_of(item[0]), item[1], buf)
        self.queue.append((item, buf))
        self.cursor = item

    def _fill_ring(self) -> None:
        while len(self.queue) < len(self.ring):
            item = self._next_block(self.cursor)
            if item is None:
                break
            self._issue(item)
        ahead = self._next_block(self.cursor)  # start the disk read of the next one while these copy
        if ahead is not None:
            self.experts[self._role_of(ahead[0])].store.prefetch(ahead[1])

    # ---------------------------------------------------------------- copies
    def _copy(self, role: str, piece: Piece, buf: Buffer) -> Layout:
        """Copy one piece of `role` into `buf` (after its previous reader finished); returns its layout."""
        expert = self.experts[role]
        layout, host, shell = expert.store.fetch(piece)
        if shell is not None:  # first read of a file-backed block: its module structure arrives with it
            expert.model.blocks[piece] = shell
        with self.streams.use(self.copy_stream):
            if buf.free is not None:
                self.copy_stream.wait_event(buf.free)
            dst = buf.reserve(layout.nbytes)
            self.telemetry.copy_wait_s += self.streams.copy(dst[: layout.nbytes], host[: layout.nbytes])
            buf.loaded = self.streams.event()
            buf.loaded.record(self.copy_stream)
        expert.store.release(host, buf.loaded)
        self.telemetry.bytes_moved += layout.nbytes
        return layout

    def _wait(self, buf: Buffer) -> None:
        """Make the compute stream wait for `buf`'s copy, timing the stall with a pair of events."""
        if buf.loaded is not None:
            stream = self.streams.current_stream()
            before, after = self.streams.event(timing=True), self.streams.event(timing=True)
            before.record(stream)
            stream.wait_event(buf.loaded)
            after.record(stream)
            self.stall_events.append((before, after))

    def _done(self, buf: Buffer) -> None:
        buf.free = self.streams.event()
        buf.free.record(self.streams.current_stream())

    def _bind(self, expert: Expert, shell: nn.Module, layout: Layout, buf: Buffer) -> None:
        """Point `shell` at `layout`'s views on `buf`. Its own tensors are saved the first time and put back
        when the expert is released (not after every block: a streamed block is simply re-pointed next time)."""
        key = (id(shell), id(layout))
        hit = self.places.get(key)
        if hit is None or hit[0] is not shell or hit[1] is not layout:
            hit = self.places[key] = (shell, layout, tables(shell, layout))
        where = hit[2]
        if key not in expert.homes:
            expert.homes[key] = [(table, leaf, table[leaf]) for table, leaf in where]
        for (table, leaf), t in zip(where, buf.views(layout)):
            table[leaf] = t

    def _layout(self, role: str, piece: Piece) -> Layout:
        expert = self.experts[role]
        layout = expert.store.layout(piece)
        return layout if layout is not None else layout_of(shell_of(expert.model, piece), piece_filter(piece))

    # ---------------------------------------------------------------- experts
    def activate(self, role: str) -> nn.Module:
        """Bind `role`'s pre, head and resident pieces (copying what the previous forward did not prefetch);
        the previous expert's views are dropped first, so both are never on the device together."""
        if role == self.active:
            return self.experts[role].model
        switching = self.active is not None
        if switching:
            self._release(self.active)
        expert = self.experts[role]
        first_event, copying = len(self.stall_events), self.telemetry.copy_wait_s
        pieces = () if self.in_place[role] else (("pre", self.pre), ("head", self.head),
                                                 *((i, self.resident_bufs[i]) for i in range(self.resident)))
        for piece, buf in pieces:
            if (role, piece) not in self.preloaded:
                self._copy(role, piece, buf)
            self._wait(buf)
            self._bind(expert, shell_of(expert.model, piece), self._layout(role, piece), buf)
        self.preloaded = {p for p in self.preloaded if p[0] != role}
        if switching:
            self.switch_events += self.stall_events[first_event:]
            self.telemetry.switch_stall_s += self.telemetry.copy_wait_s - copying  # host copies block the caller
        self.active = role
        if self.schedule is None:
            self._reset_queue()
        return expert.model

    def _release(self, role: str) -> None:
        expert = self.experts[role]
        for saved in expert.homes.values():
            unbind(saved)
        expert.homes.clear()
        for buf in (self.pre, self.head, *self.resident_bufs):
            self._done(buf)

    def _next_role(self, forward: int) -> str | None:
        if self.schedule is None or forward + 1 >= len(self.schedule):
            return None
        nxt = self.schedule[forward + 1]
        return nxt if nxt != self.schedule[forward] else None

    def _preload(self, role: str, piece: Piece, buf: Buffer) -> None:
        self._done(buf)  # the current expert's last use of this buffer is now queued
        self._copy(role, piece, buf)
        self.preloaded.add((role, piece))

    # ---------------------------------------------------------------- the runner
    def run_blocks(self, role: str, blocks, x: torch.Tensor, inputs, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """`WanDiT.runner` for expert `role`: blocks[start:stop], the resident ones in place, the others through
        the ring. A forward may come as several ranges (a step cache); it ends with the range reaching the last
        block (an empty range after that, a step cache's back range when it has no back blocks, is no new
        forward)."""
        stop = self.num_blocks if stop is None else stop
        if start == stop == self.num_blocks and not self.in_forward:
            return x
        if role != self.active:
            self.activate(role)
        n = self.forward
        if not self.in_forward:
            self._begin_forward(role, n)
        if self.in_place[role]:
            for i in range(start, stop):
                x = blocks[i](x, inputs)
        else:
            upcoming = self._next_role(n)
            for i in range(start, stop):
                if i < self.resident:
                    x = blocks[i](x, inputs)
                    if upcoming is not None:
                        self._preload(upcoming, i, self.resident_bufs[i])
                    continue
                if not self.queue or self.queue[0][0] != (n, i):
                    self._reset_queue()  # the prefetcher guessed another block (or none): copy this one now
                    self._issue((n, i))
                self._fill_ring()
                _, buf = self.queue.popleft()
                self._wait(buf)
                self._bind(self.experts[role], blocks[i], self._layout(role, i), buf)
                x = blocks[i](x, inputs)
                self.ran.add(i)
                self._done(buf)
                self._fill_ring()
        if stop == self.num_blocks:
            self._end_forward(role)
        return x

    def _begin_forward(self, role: str, n: int) -> None:
        self.in_forward = True
        self.ran.clear()
        if self.in_place[role]:
            return
        if self.schedule is not None and (n >= len(self.schedule) or self.schedule[n] != role):
            self.schedule = None  # called outside the announced schedule: stream this expert only
            self._reset_queue()
        upcoming = self._next_role(n)
        if upcoming is not None:
            self._preload(upcoming, "pre", self.pre)  # this forward is past its embeddings
            store = self.experts[upcoming].store
            for i in range(self.resident):
                store.prefetch(i)

    def _end_forward(self, role: str) -> None:
        if not self.in_place[role]:  # streamed blocks this forward skipped never crossed the bus
            for i in range(self.resident, self.num_blocks):
                if i not in self.ran:
                    self.telemetry.bytes_not_moved += self._layout(role, i).nbytes
        self.in_forward = False
        self.forward += 1

    def park(self) -> Telemetry:
        """Release every device buffer and fold the timed stalls and reads into the telemetry (one stream
        sync); the host copies stay, so the next generation (`set_schedule`, `activate`) starts from them."""
        if self.active is not None:
            self._release(self.active)
            self.active = None
        self.streams.current_stream().synchronize()
        self.copy_stream.synchronize()
        self.telemetry.copy_wait_s += sum(b.elapsed_time(a) / 1000 for b, a in self.stall_events)
        self.telemetry.switch_stall_s += sum(b.elapsed_time(a) / 1000 for b, a in self.switch_events)
        self.telemetry.sample(self.device)
        for expert in self.experts.values():
            if hasattr(expert.store, "read_wait_s"):
                self.telemetry.read_wait_s += expert.store.read_wait_s
                expert.store.read_wait_s = 0.0
        self.queue.clear()
        self.preloaded.clear()
        for buf in (self.pre, self.head, *self.resident_bufs, *self.ring):
            buf.data, buf.loaded, buf.free = torch.empty(0, dtype=torch.uint8), None, None
            buf.cached_views.clear()
        self.stall_events.clear()
        self.switch_events.clear()
        self.places.clear()
        return self.telemetry

    def finish(self) -> Telemetry:
        """`park`, then close the host copies and give the models back their plain runners."""
        self.park()
        for role, expert in self.experts.items():
            expert.model.runner = self.plain_runners[role]  # detached: the model runs as it did before
            expert.store.close()
        return self.telemetry
