"""Generation progress for people: a rich bar on a terminal, one plain line per event otherwise."""
from __future__ import annotations

import sys

PHASES = {"high_noise": "high noise", "low_noise": "low noise", "main": "denoise"}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(event: dict) -> str:
    rate = event["elapsed"] / event["i"]
    phase = PHASES.get(event["role"], event["role"])
    return (f"step {event['i']}/{event['total']}  {phase} {event['role_i']}/{event['role_total']}  "
            f"{rate:.2f} s/step  ETA {_clock(rate * (event['total'] - event['i']))}")


class ProgressPrinter:
    """Callable receiving `generate` events; use as a context manager around the call."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.rich = None
        self.bar = None

    def __enter__(self):
        if self.stream.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[rate]}"),
                                 TimeRemainingColumn())
            self.rich.__enter__()
        return self

    def __exit__(self, *exc):
        if self.rich is not None:
            self.rich.__exit__(*exc)

    def _print(self, text: str) -> None:
        if self.rich is not None:
            self.rich.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "stage":
            self._print(f"{event['name']} ...")
        elif kind == "warning":
            self._print(f"warning: {event['message']}")
        elif kind == "plan":
            self._print(event["summary"])
        elif kind == "step":
            if self.rich is None:
                self._print(step_line(event))
                return
            phase = PHASES.get(event["role"], event["role"])
            desc = f"{phase} {event['role_i']}/{event['role_total']}"
            rate = f"{event['elapsed'] / event['i']:.2f} s/step"
            if self.bar is None:
                self.bar = self.rich.add_task(desc, total=event["total"], rate=rate)
            self.rich.update(self.bar, completed=event["i"], description=desc, rate=rate)
