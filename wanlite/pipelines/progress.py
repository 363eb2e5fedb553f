"""Generation progress for people: rich bars on a terminal, one updating line elsewhere (a notebook, a log).

`ProgressDisplay` receives the events `execute` emits: loading (bytes, MB/s), each stage, each denoising step
with the ETA of the whole run (the steps left, a pending expert load at the switch, the VAE decode), and the
total wall time at the end. Each stage leaves one line behind; the step and load counters update in place.
"""
from __future__ import annotations

import sys
import time

PHASES = {"high_noise": "high noise", "low_noise": "low noise", "main": "denoise"}


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(event: dict, rate: float, eta: float) -> str:
    phase = PHASES.get(event["role"], event["role"])
    part = f"{event['unit']} {event['part']}/{event['parts']} " if "part" in event else ""
    return (f"{part}step {event['i']}/{event['total']}  {phase} {event['role_i']}/{event['role_total']}  "
            f"{rate:.2f} s/step  ETA {clock(eta)}")


def load_line(event: dict) -> str:
    rate = event["done"] / max(event["seconds"], 1e-9)
    return (f"loading {event['what']}  {event['done'] / 1e9:.2f}/{event['total'] / 1e9:.2f} GB  "
            f"{rate / 1e6:.0f} MB/s")


class Eta:
    """The whole run's remaining time from the steps so far: the steps left at the measured rate (loads during
    denoising not counted in it), the decode(s) in step units, and the expert still to be loaded at the switch
    (as long as the first one took)."""

    def __init__(self):
        self.stage: dict = {}
        self.loading_s = 0.0  # loads since the denoise stage began (an expert at the switch)
        self.transformer_load_s = 0.0
        self.roles: set[str] = set()

    def on_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "stage" and event["name"].startswith("denoise"):
            self.stage, self.loading_s, self.roles = event, 0.0, set()
        elif kind == "loaded":
            if event["what"].startswith("transformer"):
                self.transformer_load_s = event["seconds"]
            if self.stage:
                self.loading_s += event["seconds"]
        elif kind == "expert":
            self.roles.add(event["role"])
        elif kind == "stage":
            self.stage = {}

    def after(self, event: dict) -> tuple[float, float]:
        """(s/step, ETA) after a step event."""
        i, total = event["i"], event["total"]
        rate = max(event["elapsed"] - self.loading_s, 0.0) / i
        decode = self.stage.get("decode_steps", 0.0)
        steps_left = (total - i) + decode + (event.get("parts", 1) - event.get("part", 1)) * (total + decode)
        switch_pending = self.stage.get("switch_loads") and set(self.stage.get("schedule", ())) - self.roles
        return rate, rate * steps_left + (self.transformer_load_s if switch_pending else 0.0)


class ProgressDisplay:
    """Callable receiving `generate` events; use as a context manager around the call. `stream`: where it
    writes (stdout by default); a terminal gets rich bars, anything else one line rewritten with `\\r`."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.rich = self.bar = None
        self.eta = Eta()
        self.status = ""  # the line being updated
        self.started = time.perf_counter()

    def __enter__(self):
        self.started = time.perf_counter()
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(file=self.stream), transient=True)
            self.rich.__enter__()
            self.bar = self.rich.add_task("", total=None, info="")
        return self

    def __exit__(self, *exc):
        self._end_line()
        if self.rich is not None:
            self.rich.__exit__(*exc)

    def _print(self, text: str, replacing: bool = False) -> None:
        """A line that stays (`replacing`: in place of the line being updated)."""
        if replacing and self.status and self.rich is None:
            self.stream.write("\r" + text.ljust(len(self.status)) + "\n")
            self.stream.flush()
            self.status = ""
            return
        self._end_line()
        if self.rich is not None:
            self.rich.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def _update(self, text: str, done: float | None = None, total: float | None = None) -> None:
        """The line that changes in place; a line of another kind (a load amid the steps) starts below it."""
        if self.status.split(" ", 1)[0] != text.split(" ", 1)[0]:
            self._end_line()
        if self.rich is not None:
            label, _, info = text.partition("  ")
            self.rich.update(self.bar, description=label, completed=done or 0, total=total, info=info)
        else:
            pad = max(len(self.status) - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        self.status = text

    def _end_line(self) -> None:
        if self.status and self.rich is None:
            self.stream.write("\n")
            self.stream.flush()
        self.status = ""

    def __call__(self, event: dict) -> None:
        self.eta.on_event(event)
        kind = event["event"]
        if kind == "plan":
            self._print(event["summary"])
        elif kind in ("warning", "reload"):
            self._print(f"{'note' if kind == 'reload' else 'warning'}: {event['message']}")
        elif kind == "prompt":  # the prompt extender's rewrite, beside what was typed
            self._print(event["message"])
        elif kind == "stage":
            self._print(f"{event['name']} ...")
        elif kind == "load":
            self._update(load_line(event), event["done"], event["total"])
        elif kind == "loaded" and event["bytes"]:
            rate = event["bytes"] / max(event["seconds"], 1e-9) / 1e6
            quantized = f", quantized at {event['quantize_MBps']:.0f} MB/s" if event.get("quantize_MBps") else ""
            self._print(f"loaded {event['what']}: {event['bytes'] / 1e9:.2f} GB in {event['seconds']:.1f} s "
                        f"({rate:.0f} MB/s{quantized})", replacing=True)
        elif kind == "step":
            rate, eta = self.eta.after(event)
            self._update(step_line(event, rate, eta), event["i"], event["total"])
        elif kind == "done":
            self._print(f"done in {clock(event['seconds'])}")
