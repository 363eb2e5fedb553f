"""Resuming a generation after Ctrl-C, SIGTERM or a CUDA out-of-memory error, bit for bit.

After every finished denoising step `execute` keeps a `Checkpoint` in memory: the sampler's carry (the sample and
its multistep history), the step cache's state, the multi-part task's history (S2V motion frames, Animate's last
segment), the frames of the parts already decoded and the RNG state. These are references to the live tensors,
not copies: a step replaces them and never writes into them. When the run is stopped the checkpoint is copied to
the host and written (temp file + rename) beside the output as `<output>.resume.pt`, with the job as its dict:

    {"format": 1, "job": {...}, "output": "...", "run": r, "step": k, "runs": R, "steps": N,
     "carry": {...}, "cache": {...}, "parts": {...}, "pieces": [uint8 tensors], "rng": {"cpu": ...}}

It holds plain tensors, numbers and strings only and is read back with `torch.load(weights_only=True)`: a resume
file is untrusted input. A job that differs from the file's in anything but placement (what a re-plan changes:
offload, chunks, VAE tiles, CFG batching, where the text encoder runs) is refused. The file is removed once the
video is written.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from wanlite._version import __version__
from wanlite.errors import Interrupted, OutOfMemory, WanliteError
from wanlite.pipelines.job import Job

FORMAT = 1
MAX_REPLANS = 2  # an out-of-memory error re-plans and resumes in the same process at most this often
FAULT_ENV = "WANLITE_FAULT"
# job fields a re-plan may change: where things run, never what is computed (plus text_encoder.device,
# vae.tile / vae.overlap and each LoRA's merge_outside_blocks, which follows the offload)
PLACEMENT = ("offload", "chunk_tokens", "cfg", "keep", "machine", "predicted", "reasons", "warnings")


def resume_path(output: Path) -> Path:
    """The resume file of an output: `video.mp4` -> `video.mp4.resume.pt`."""
    output = Path(output)
    return output.with_name(output.name + ".resume.pt")


@dataclass
class Checkpoint:
    """A run's state after its last finished step: `run` (S2V clip, Animate segment) has `step` of `steps`
    steps done (all of them: only its decode is left); every run before it is decoded into `pieces`."""

    run: int
    step: int
    runs: int
    steps: int
    carry: dict | None  # the sampler's (samplers.py); None: the run has not started
    cache: dict | None  # StepCache.state_dict(); None: no step cache
    parts: dict  # the runs' history (segments.py `state()`)
    pieces: list  # uint8 [n, H, W, 3] numpy frames of the runs already decoded
    rng: dict  # torch's global generators

    @property
    def finished(self) -> int:
        return self.run * self.steps + self.step

    @property
    def decoding(self) -> bool:
        """Only the last run's decode is left."""
        return self.run == self.runs - 1 and self.step == self.steps

    def where(self, unit: str | None = None) -> str:
        part = "" if self.runs == 1 else f"{unit or 'part'} {self.run + 1}/{self.runs}, "
        return f"{part}step {self.step}/{self.steps}"

    def to_host(self) -> Checkpoint:
        """A copy on the host (the device's memory may be gone next)."""
        return replace(self, carry=_host(self.carry), cache=_host(self.cache), parts=_host(self.parts),
                       pieces=list(self.pieces), rng=_host(self.rng))


def _host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return value


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Tracker:
    """Keeps the latest checkpoint of a run (`execute` calls `step` after each finished step) and turns an
    interruption into its error, with the resume file written."""

    def __init__(self, job: Job, path: Path | None, runs, steps: int, step_cache, pieces: list,
                 device: torch.device, start: Checkpoint | None = None):
        self.job, self.path, self.runs, self.steps, self.step_cache = job, path, runs, steps, step_cache
        self.pieces, self.device = pieces, device
        self.latest = start

    def step(self, r: int, carry: dict) -> None:
        self.latest = Checkpoint(r, int(carry["next"]), self.runs.count, self.steps, carry,
                                 None if self.step_cache is None else self.step_cache.state_dict(),
                                 self.runs.state(), list(self.pieces), rng_state(self.device))

    def stopped(self, exc: BaseException, decoding: bool) -> BaseException | None:
        """The error to raise for `exc` when it stops the run (Ctrl-C, SIGTERM, out of memory), the resume file
        written; None for any other error."""
        oom = isinstance(exc, torch.OutOfMemoryError)
        if not (oom or isinstance(exc, KeyboardInterrupt)):
            return None
        state = None if self.latest is None else self.latest.to_host()
        file = None
        if state is not None and state.finished > 0 and self.path is not None:
            file = write_checkpoint(resume_path(self.path), state, self.job, self.path)
        where = "before the first step finished" if state is None or state.finished == 0 else (
            f"{'in the decode after' if decoding else 'at'} {state.where(self.runs.unit)}")
        if oom:
            error = OutOfMemory(f"out of memory {where}" + ("" if file is None else f"; the run state is in {file}"),
                                file)
            error.checkpoint = state  # what Pipeline resumes from in this process
            return error
        name = getattr(exc, "signal_name", "SIGINT")
        tail = "" if file is None else (f"; the run state is in {file}: the same call (or resume={str(file)!r}) "
                                         "continues")
        return Interrupted(f"interrupted ({name}) {where}{tail}", name, file, where)

    def finished(self) -> None:
        """The video is written: its resume file goes."""
        if self.path is not None:
            resume_path(self.path).unlink(missing_ok=True)


def write_checkpoint(file: Path, state: Checkpoint, job: Job, output: Path) -> Path:
    """Write atomically (temp file + rename) beside the output."""
    record = {"format": FORMAT, "wanlite": __version__, "job": job.to_dict(), "output": str(output),
              **{f.name: getattr(state, f.name) for f in fields(state)}}
    record["pieces"] = [torch.from_numpy(np.ascontiguousarray(p)) for p in state.pieces]
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


@dataclass
class Saved:
    """A resume file as read: the job it was written for, the output it was writing, the checkpoint."""

    file: Path
    job: dict
    output: str
    checkpoint: Checkpoint

    @property
    def seed(self) -> int:
        return int(self.job["settings"]["seed"])


def read_checkpoint(file: Path) -> Saved:
    """A resume file, loaded with `weights_only=True` (plain tensors and values only); one-line errors."""
    file = Path(file)
    if not file.is_file():
        raise WanliteError(f"--resume {file} does not exist")
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise WanliteError(f"--resume {file} is not a wanlite resume file ({type(exc).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WanliteError(f"--resume {file} is not a wanlite resume file of format {FORMAT}")
    try:
        state = Checkpoint(**{f.name: record[f.name] for f in fields(Checkpoint)})
        state.pieces = [p.numpy() for p in state.pieces]
        if not (0 <= state.run < state.runs and 0 <= state.step <= state.steps):
            raise ValueError("position")
        return Saved(file, dict(record["job"]), str(record["output"]), state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WanliteError(f"--resume {file} is damaged ({type(exc).__name__}: {exc})") from None


def _comparable(job: dict) -> dict:
    job = {k: v for k, v in job.items() if k not in PLACEMENT}
    if isinstance(job.get("text_encoder"), dict):
        job["text_encoder"] = {k: v for k, v in job["text_encoder"].items() if k != "device"}
    if isinstance(job.get("vae"), dict):
        job["vae"] = {k: v for k, v in job["vae"].items() if k not in ("tile", "overlap")}
    if isinstance(job.get("loras"), list):
        job["loras"] = [{k: v for k, v in p.items() if k != "merge_outside_blocks"} if isinstance(p, dict) else p
                        for p in job["loras"]]
    return job


def with_saved_prompt(job: Job, saved: Saved) -> Job:
    """`job` with the prompt its saved run was made from when that run rewrote the user's prompt
    (`--use_prompt_extend`): the saved settings hold the rewrite, `prompt_extend.original_prompt` what the user
    typed. The extender does not run again: a hosted or a changed model would not give the same rewrite."""
    plan, was = job.prompt_extend, saved.job.get("prompt_extend")
    if plan is None or plan.original_prompt is not None or not isinstance(was, dict):
        return job
    rewrite, error = (saved.job.get("settings") or {}).get("prompt"), was.get("error")
    if was.get("original_prompt") != job.settings.prompt or not isinstance(rewrite, str):
        return job  # another prompt: check_job names it
    return replace(job, settings=replace(job.settings, prompt=rewrite),
                   prompt_extend=replace(plan, original_prompt=job.settings.prompt,
                                         error=error if isinstance(error, str) else None))


def check_job(saved: Saved, job: Job) -> None:
    """Refuse a resume file for another job: anything but placement differs (one line, exit code 2)."""
    before, now = _comparable(saved.job), _comparable(job.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if "settings" in changed:
        s0, s1 = before.get("settings") or {}, now.get("settings") or {}
        changed.remove("settings")
        changed += sorted(k for k in s0.keys() | s1.keys() if s0.get(k) != s1.get(k))
    if changed:
        raise WanliteError(f"--resume {saved.file} was written for another job (its {', '.join(changed)} "
                           f"{'differs' if len(changed) == 1 else 'differ'}); "
                           "give the options it was started with, or delete it to start over")


def with_placement(job: Job, planned: Job) -> Job:
    """`job` placed as `planned` (a re-plan of the same request): only the fields that decide where things run
    and in which pieces change, never the numbers that decide the frames."""
    loras = job.loras
    if [(p.role, p.files, p.mode) for p in job.loras] == [(p.role, p.files, p.mode) for p in planned.loras]:
        loras = planned.loras
    return replace(job, offload=planned.offload, chunk_tokens=planned.chunk_tokens, cfg=planned.cfg,
                   keep=planned.keep, machine=planned.machine, predicted=planned.predicted, reasons=planned.reasons,
                   text_encoder=replace(job.text_encoder, device=planned.text_encoder.device),
                   vae=replace(job.vae, tile=planned.vae.tile, overlap=planned.vae.overlap), loras=loras)


def placement_changes(before: Job, after: Job) -> str:
    """What a re-plan changed, for its one line."""
    def items(j: Job) -> dict:
        return {"offload": j.offload.describe(), "chunk tokens": j.chunk_tokens or "whole",
                "VAE tiles": j.vae.tile or "off", "CFG": j.cfg, "text encoder on": j.text_encoder.device}
    a, b = items(before), items(after)
    changed = [f"{name} {a[name]} -> {b[name]}" for name in a if a[name] != b[name]]
    return ", ".join(changed) if changed else "the same placement (nothing smaller to choose)"


# what to try after an out-of-memory error in a stage before the steps (a Pipeline re-plans first)
T5_FIX = "add --t5_cpu (the text encoder on the CPU) or free GPU memory (other programs on it)"
CONDITIONING_FIX = "free GPU memory (other programs on it), or lower --size"


@contextmanager
def out_of_memory_in(stage: str, fix: str, resume: Checkpoint | None):
    """A device out-of-memory error in a stage before the steps (the text encoder, the image / audio encoders)
    as `OutOfMemory`: one line naming the stage and what to try. Its checkpoint is the one the run started from,
    so a Pipeline re-plans and starts that run again as after an error in a step."""
    try:
        yield
    except torch.OutOfMemoryError:
        error = OutOfMemory(f"out of memory {stage}; {fix}")
        error.checkpoint = resume
        raise error from None


@contextmanager
def interruptible():
    """While a generation runs, SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt), so the run stops
    at a Python boundary, writes its resume file and removes partial outputs; the previous handlers come back
    after. Only the main thread can take signals; Windows has no SIGTERM to catch from another process."""
    names = [name for name in ("SIGINT", "SIGTERM") if getattr(signal, name, None) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in names:
        previous[name] = signal.signal(getattr(signal, name), _raise_interrupted)
    try:
        yield
    finally:
        for name, handler in previous.items():
            if handler is not None:  # None: installed from C, cannot be put back from Python
                signal.signal(getattr(signal, name), handler)


def _raise_interrupted(signum, frame) -> None:
    name = signal.Signals(signum).name
    raise Interrupted(f"interrupted ({name})", name)


_fired: Counter = Counter()


def inject(where: str, n: int) -> None:
    """Test hook (fault injection), read here only: WANLITE_FAULT="KIND@WHERE[:N][*TIMES],..." acts at the N-th
    step of the whole generation (counted from 1 across S2V clips / Animate segments) or at the N-th decode
    (no N: any). KIND: oom raises torch.OutOfMemoryError, sigint / sigterm send this process the signal, pause
    prints one line to stderr and sleeps 60 s (for a test to send a signal from outside). Each entry acts TIMES
    times (default 1) per process. Example: WANLITE_FAULT=oom@step:3 or oom@decode*3 or sigterm@step:2."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for entry in spec.split(","):
        entry = entry.strip()
        kind, _, rest = entry.partition("@")
        rest, _, times = rest.partition("*")
        place, _, at = rest.partition(":")
        if place != where or (at and int(at) != n) or _fired[entry] >= (int(times) if times else 1):
            continue
        _fired[entry] += 1
        if kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV}={spec} at {where} {n})")
        if kind in ("sigint", "sigterm"):
            os.kill(os.getpid(), getattr(signal, kind.upper()))
            time.sleep(5)  # the handler raises at the next bytecode
        elif kind == "pause":
            print(f"wanlite fault: paused at {where} {n}", file=sys.stderr, flush=True)
            time.sleep(60)
        else:
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} in {entry!r}")
