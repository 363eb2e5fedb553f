"""Run a function on N local ranks, as torchrun would start them: the gloo backend on the CPU, 127.0.0.1 only,
bounded in time. Used by the multi-GPU tests and bench/parallel.py."""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, out: str, fn, args, env: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size), **env})
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: the ranks do not fight over the cores
    try:
        result = ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        result = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(size: int, fn, *args, folder: Path, timeout_s: float = 300.0, env: dict | None = None) -> list:
    """`fn(*args)` on ranks 0..size-1 (each a spawned process with torchrun's environment variables); returns
    each rank's ("ok", value) or ("error", message, traceback). A rank still running after `timeout_s` is killed
    and reported as ("hang", ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(size, free_port(), str(folder), fn, args, env or {}),
                                 nprocs=size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:  # every rank runs to its end (a failed one does not stop the others: how they react is the point)
        while any(process.is_alive() for process in context.processes) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    results = []
    for rank in range(size):
        path = folder / f"rank{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.is_file() else ("hang", f"rank {rank} did not finish"))
    return results
