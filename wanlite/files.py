"""Files as untrusted input and as output: weight paths must be regular files (a FIFO would block a read), counts
read from key names are bounded before anything is built from them, and outputs are written under a temporary
name and renamed when complete, with the cleanup of those a killed run left.

A temp file is `.NAME.<pid>.partial.EXT` beside its target (the real extension last: ffmpeg picks the container
from it). The next writer in the folder removes the temp files whose process is gone, and its own process's that
are not being written (in a container a restarted run often gets the same pid).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from wanlite.errors import CheckpointError

_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial(\.[A-Za-z0-9]+)?$")
_OPEN: set[Path] = set()  # this process's temp files being written


def regular_file_size(path: Path) -> int:
    """The size of `path` if it is a regular file; a FIFO, device or folder is refused without opening it
    (opening a FIFO for reading blocks until someone writes)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, device or socket"
        raise CheckpointError(f"{path}: is {what}, not a weight file; point wanlite at the downloaded file")
    return info.st_size


def temp_name(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def opened(tmp: Path) -> Path:
    """Mark `tmp` as being written by this process (`clean_stale` leaves it alone until `closed`)."""
    _OPEN.add(Path(tmp))
    return Path(tmp)


def closed(tmp: Path) -> None:
    _OPEN.discard(Path(tmp))


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temp files a killed run left in `folder`; returns what was removed."""
    import psutil

    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _PARTIAL.match(name)
        if m is None:
            continue
        path, pid = Path(folder) / name, int(m[1])
        mine = pid == os.getpid()
        if (mine and path not in _OPEN) or (not mine and not psutil.pid_exists(pid)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def block_count(keys, pattern: re.Pattern, limit: int, where, what: str) -> int:
    """The number of blocks that key names like `blocks.<i>.` declare, bounded before anything is built from it:
    plain decimal indices, at most `limit` blocks (the architecture's), all of 0..n-1 present."""
    indices = set()
    for key in keys:
        m = pattern.match(key) if isinstance(key, str) else None
        if m is None:
            continue
        text = m[1]
        if not (text.isascii() and len(text) <= 4 and int(text) < limit and (text == "0" or text[0] != "0")):
            raise CheckpointError(f"{where}: tensor {key[:120]!r} names {what} {text[:24]}, but a Wan model has at "
                                  f"most {limit}; the file is damaged or for another model")
        indices.add(int(text))
    count = max(indices, default=-1) + 1
    if len(indices) != count:
        gap = min(set(range(count)) - indices)
        raise CheckpointError(f"{where}: {what} {gap} is missing among {what}s 0..{count - 1}; the file is "
                              "incomplete or damaged")
    return count
