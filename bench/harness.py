"""What every benchmark shares: one result header (command, date, git revision, machine), the JSON write (temp
file + rename), and a child process whose RSS a sampling thread measures.

Every result file is a JSON object that starts with `header()`'s fields; a script adds its own fields or rows.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RESEARCH_RESULTS = Path(__file__).resolve().parent / "research" / "results"  # retrained recipes, not the bundle's

# Prepended to a measured child's code: a thread samples the process's RSS every `INTERVAL` seconds into
# `peak[0]` and into `peaks[label[0]]` (a child sets `label[0]` to book RSS to what it is doing);
# `reset_peak()` starts over after the imports, `stop_sampling()` ends it. The child prints one JSON line.
RSS_PRELUDE = r"""
import json, sys, threading, time
import psutil
_proc = psutil.Process()
baseline = _proc.memory_info().rss
peak, label, peaks, _running = [baseline], ["start"], {}, [True]
def _sample():
    while _running[0]:
        rss = _proc.memory_info().rss
        peak[0] = max(peak[0], rss)
        peaks[label[0]] = max(peaks.get(label[0], 0), rss)
        time.sleep(INTERVAL)
def reset_peak():
    global baseline
    baseline = _proc.memory_info().rss
    peak[0] = baseline
    return baseline
def stop_sampling():
    time.sleep(2 * INTERVAL)
    _running[0] = False
threading.Thread(target=_sample, daemon=True).start()
"""


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def revision() -> str | None:
    """The checkout's commit, with `-dirty` when files differ from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def header() -> dict:
    """The fields every result starts with: how to rerun it, when, at which revision, on what."""
    script = Path(sys.argv[0]).resolve()
    bench = Path(__file__).resolve().parent
    shown = script.relative_to(bench.parent).as_posix() if script.is_relative_to(bench) else str(sys.argv[0])
    return {"command": " ".join(["python", shown, *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "git": revision(), "machine": machine()}


def write_json(name: str, data, folder: Path = RESULTS) -> Path:
    """FOLDER/NAME.json (bench/results/ by default), never half-written; a dict gets the header's fields it does
    not set itself."""
    if isinstance(data, dict):
        data = {**{k: v for k, v in header().items() if k not in data}, **data}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def run_measured(code: str, args: list, interval: float = 0.02, timeout: float | None = None) -> dict:
    """Run `code` (after RSS_PRELUDE) in a fresh Python process with `args`; returns the JSON object its last
    line of output holds. A failing child raises with the end of its stderr."""
    prelude = RSS_PRELUDE.replace("INTERVAL", repr(interval))
    run = subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"measured child failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
