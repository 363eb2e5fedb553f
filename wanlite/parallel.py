"""More than one GPU: Ulysses sequence parallelism and FSDP2-sharded weights over torch.distributed.

Launched by torchrun (`torchrun --nproc_per_node N -m wanlite generate ... --ulysses_size N`), every rank runs the
same job. The DiT's tokens are cut into N equal contiguous slices, one per rank; each rank runs every block on
its slice. Norms, modulation, cross-attention and the FFN work token by token and exchange nothing; the
self-attention swaps the split from tokens to heads with one all-to-all per q / k / v, attends over every token
for H/N heads, and swaps back (DeepSpeed-Ulysses). The head's output is gathered, so the sampler steps the whole
latent on every rank: the ranks stay in lockstep with no other exchange, and a step cache's decision is the
same everywhere because its signal is averaged over the ranks. `--dit_fsdp` / `--t5_fsdp` shard each block's
weights over the ranks with FSDP2's `fully_shard` (gathered for the block's forward, freed after).

A rank whose peer is gone (crashed, killed, unreachable past the timeout) stops with one line instead of
waiting forever: the process group has a timeout, and every collective's failure becomes a `PeerLost`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wanlite.errors import WanliteError
from wanlite.models.attention import attention

TIMEOUT_ENV = "WANLITE_DIST_TIMEOUT"  # seconds a rank waits for the others at any exchange
DEFAULT_TIMEOUT_S = 1800.0  # loading a 14B expert from a slow drive can keep one rank away this long


class PeerLost(WanliteError):
    """Another rank stopped answering (it failed, was killed, or timed out)."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun ranks."""

    rank: int
    size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_ranks() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def world() -> World | None:
    """The process group this process belongs to, None when it runs alone."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return World(dist.get_rank(), dist.get_world_size())


def world_for(ranks: int) -> World:
    """The process group a job planned for `ranks` GPUs runs in (one-line error when it was launched otherwise)."""
    current = world()
    if current is None or current.size != ranks:
        raise WanliteError(f"this job splits its work over {ranks} GPUs: launch it with torchrun --nproc_per_node "
                           f"{ranks} -m wanlite generate ... --ulysses_size {ranks}")
    return current


def is_leader() -> bool:
    """Rank 0, or a process on its own: the one that prints and writes."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def join(ranks: int, device: str) -> World | None:
    """Join the torchrun process group a request for `ranks` ranks needs (None for one rank), checking the launch
    matches: every rank raises the same one-line error when it does not."""
    launched = launched_ranks()
    if ranks <= 1:
        if launched > 1:
            raise WanliteError(f"torchrun started {launched} processes but --ulysses_size is 1; pass --ulysses_size "
                               f"{launched} to split the work over them")
        return None
    if launched != ranks:
        raise WanliteError(f"--ulysses_size {ranks} needs {ranks} processes: launch with torchrun --nproc_per_node "
                           f"{ranks} -m wanlite generate ... (started: {launched})")
    current = world()
    if current is not None:
        return current
    if not dist.is_available():
        raise WanliteError("this torch build has no torch.distributed; install the official PyTorch wheel to run on "
                           "several GPUs")
    cuda = device != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise WanliteError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); use "
                               "--nproc_per_node at most the number of GPUs")
        if not dist.is_nccl_available():  # Windows builds: gloo has no all-to-all for CUDA tensors
            raise WanliteError("several GPUs need NCCL, which this torch build lacks (Windows has none): run under "
                               "Linux or WSL2, or on one GPU without --ulysses_size")
        torch.cuda.set_device(local)
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        raise PeerLost(f"could not join the other ranks ({_first_line(exc)}); check MASTER_ADDR / MASTER_PORT "
                       "and that every rank was started") from None
    return world()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _guarded(collective, *args, **kwargs):
    """Run a collective; a failure (a peer gone, the timeout passed) is one line, not a hang or a traceback."""
    try:
        return collective(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerLost(f"rank {rank} lost the other ranks ({_first_line(exc)}); see the first rank that failed "
                       f"for the cause (the wait is bounded by {TIMEOUT_ENV}, default {DEFAULT_TIMEOUT_S:.0f} s)") from None


def share(value, world: World):
    """`value` from rank 0 on every rank (pickled): how one resolved job reaches all ranks."""
    box = [value if world.leader else None]
    _guarded(dist.broadcast_object_list, box, src=0)
    return box[0]


@dataclass(frozen=True)
class Slice:
    """One rank's tokens [start, stop) and the modulation rows they use: `rows` of the per-frame vectors and
    `split`, the tokens of each of those rows (None: one row for every token)."""

    start: int
    stop: int
    rows: slice
    split: tuple[int, ...] | None


def token_slice(length: int, frames: int, rank: int, ranks: int) -> Slice:
    """Rank `rank`'s share of `length` tokens in `frames` equal latent frames (frames == 1: one shared row)."""
    if length % ranks:
        raise WanliteError(f"{length} tokens do not split over {ranks} ranks; pick a --size / --frame_num whose "
                           f"latent tokens are a multiple of {ranks}")
    per = length // ranks
    start, stop = rank * per, (rank + 1) * per
    if frames == 1:
        return Slice(start, stop, slice(0, 1), None)
    frame = length // frames
    first, last = start // frame, (stop - 1) // frame
    split = tuple(min(stop, (f + 1) * frame) - max(start, f * frame) for f in range(first, last + 1))
    return Slice(start, stop, slice(first, last + 1), split)


class SequenceParallel:
    """What a DiT needs to run on its slice of the tokens (`WanDiT.sequence_parallel`): the slice, the Ulysses
    attention and the gather of the output."""

    def __init__(self, world: World):
        self.rank, self.size = world.rank, world.size

    def slice(self, length: int, frames: int) -> Slice:
        return token_slice(length, frames, self.rank, self.size)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Self-attention of this rank's tokens [B, l, H, D] over everyone's: heads are swapped for tokens, the
        attention runs over all N*l tokens for H/N heads (`chunk` queries at a time), and swapped back."""
        heads = q.shape[2]
        if heads % self.size:
            raise WanliteError(f"{heads} attention heads do not split over {self.size} ranks; use a --ulysses_size "
                               f"that divides {heads}")
        q, k, v = self._to_heads(q), self._to_heads(k), self._to_heads(v)
        length = q.shape[1]
        if not chunk or chunk >= length:
            out = attention(q, k, v)
        else:
            out = torch.empty_like(q)
            for s in range(0, length, chunk):
                out[:, s:s + chunk] = attention(q[:, s:s + chunk], k, v)
        del q, k, v
        return self._to_tokens(out)

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, l, H, D] of my tokens -> [B, N*l, H/N, D]: every rank's tokens, my group of heads."""
        b, l, h, d = t.shape
        n = self.size
        send = t.reshape(b, l, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, l, H/N, D]: part j to rank j
        received = torch.empty_like(send)  # [N, B, l, H/N, D]: part i is rank i's tokens
        _guarded(dist.all_to_all_single, received, send)
        return received.permute(1, 0, 2, 3, 4).reshape(b, n * l, h // n, d)

    def _to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N*l, H/N, D] -> [B, l, H, D]: the inverse of `_to_heads`."""
        b, length, hn, d = t.shape
        n = self.size
        send = t.reshape(b, n, length // n, hn, d).transpose(0, 1).contiguous()  # part j: rank j's tokens
        received = torch.empty_like(send)  # part i: my tokens for rank i's heads
        _guarded(dist.all_to_all_single, received, send)
        return received.permute(1, 2, 0, 3, 4).reshape(b, length // n, n * hn, d)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, l, ...] from every rank -> [B, N*l, ...] in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        _guarded(dist.all_gather, parts, t.contiguous())
        return torch.cat(parts, dim=1)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (a step cache's signal, so every rank decides alike)."""
        t = t.clone()
        _guarded(dist.all_reduce, t)
        return t / self.size


def shard_blocks(model: torch.nn.Module, blocks) -> torch.nn.Module:
    """FSDP2 `fully_shard` over all ranks: each of `blocks` one unit (its weights gathered for its forward and
    freed after), the rest of `model` the root unit. Inference only: no gradients are kept."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model
