"""A queue of generations on one pipeline (`wanlite generate --prompt_file FILE`, `--num_videos N`).

FILE is text (one prompt per line; blank lines and lines starting with # skipped) or JSONL (one object per
line: "prompt" and any generate option to put over the command's, e.g. {"prompt": "...", "seed": 3,
"size": "832*480", "lora": ["a.safetensors:0.8"]}). Models load once; items run in order; an item that fails
is reported and the queue goes on.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from wanlite.errors import WanliteError


@dataclass
class Item:
    label: str  # where it came from: "line 3", "line 3 #2" for the second of --num_videos
    options: dict = field(default_factory=dict)  # Request fields over the command's request
    error: str | None = None  # a line that could not be read


@dataclass
class Outcome:
    item: Item
    prompt: str
    seed: int | None = None
    path: Path | None = None
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0


def read_queue(path: Path) -> list[Item]:
    """The items of a prompt file; a line that is not valid JSON (in a JSONL file) becomes an item with its
    error, so the rest still run. A file that cannot be read at all is an error (exit code 2)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WanliteError(f"--prompt_file {path}: cannot read it ({exc.__class__.__name__}); give a UTF-8 text "
                           "or JSONL file") from None
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    jsonl = path.suffix.lower() == ".jsonl" or (numbered and numbered[0][1].startswith("{"))
    items = []
    for n, line in numbered:
        if not jsonl:
            items.append(Item(f"line {n}", {"prompt": line}))
            continue
        try:
            options = json.loads(line)
        except json.JSONDecodeError as exc:
            items.append(Item(f"line {n}", error=f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(options, dict):
            items.append(Item(f"line {n}", error=f"expected a JSON object, found {type(options).__name__}"))
        elif not isinstance(options.get("prompt", ""), str):
            items.append(Item(f"line {n}", error="\"prompt\" must be a string"))
        else:
            items.append(Item(f"line {n}", options))
    if not items:
        raise WanliteError(f"--prompt_file {path} holds no prompts")
    return items


def with_seeds(items: list[Item], count: int, seed: int) -> list[Item]:
    """Each item `count` times with consecutive seeds (from the item's seed, else the command's; -1 draws a
    random seed for each video)."""
    if count < 1:
        raise WanliteError(f"--num_videos {count} must be 1 or more")
    if count == 1:
        return items
    out = []
    for item in items:
        first = item.options.get("seed", item.options.get("base_seed", seed))
        for k in range(count):
            options = {key: v for key, v in item.options.items() if key != "base_seed"}
            options["seed"] = -1 if first is None or first < 0 else first + k
            out.append(Item(f"{item.label} #{k + 1}", options, item.error))
    return out


def run_queue(pipe, items: list[Item], report) -> list[Outcome]:
    """Generate every item on `pipe`; `report(position, outcome)` after each. Ctrl-C stops the queue."""
    outcomes = []
    for item in items:
        started = time.perf_counter()
        outcome = Outcome(item, str(item.options.get("prompt", pipe.request.prompt)))
        if item.error is not None:
            outcome.error, outcome.exit_code = item.error, 2
        else:
            try:
                result = pipe.generate(**item.options)
                outcome.seed, outcome.path = result.settings.seed, result.path
            except WanliteError as exc:
                outcome.error, outcome.exit_code = str(exc), exc.exit_code
            except Exception as exc:  # noqa: BLE001 - one item's failure must not stop the queue
                outcome.error, outcome.exit_code = f"{type(exc).__name__}: {exc}", 1
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
        report(len(outcomes), outcome)
    return outcomes
