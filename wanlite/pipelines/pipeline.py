"""`wanlite.load(...) -> Pipeline`: plan once, keep the models, generate many times.

    pipe = wanlite.load(task="ti2v-5B", ckpt_dir="Wan2.2-TI2V-5B")
    video = pipe.generate(prompt="a cat surfing", seed=3, save=False).frames

Each `generate` resolves its job against the machine as it was when the pipeline started (so what the models
already hold does not change the plan), executes it with the pipeline's `Components`, and keeps what the
job's `KeepPlan` says. Options that change the plan (size, frames, LoRAs, quant...) load again only the
component whose inputs changed, and say so. The one-shot `generate(...)` is a pipeline that keeps nothing.

A generation stopped by Ctrl-C, SIGTERM or an out-of-memory error leaves `<output>.resume.pt` (resume.py); the
same call again (or `resume=FILE`) continues from its last finished step. An out-of-memory error re-plans with
the memory free now and resumes in this process, at most `MAX_REPLANS` times.
"""
from __future__ import annotations

import gc
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from wanlite.errors import OutOfMemory, WanliteError
from wanlite.parallel import join, share
from wanlite.pipelines.components import Components
from wanlite.pipelines.job import Job
from wanlite.pipelines.prompt_extend import extend_job
from wanlite.pipelines.request import Request, check_save_file, request_with
from wanlite.pipelines.resolve import machine_for, resolve
from wanlite.pipelines.resume import (MAX_REPLANS, Saved, check_job, placement_changes, read_checkpoint,
                                      resume_path, with_placement, with_saved_prompt)
from wanlite.pipelines.run import GenerationResult, Progress, execute, output_path
from wanlite.planner.probe import GB

NEW_FILE = "new file"  # `output` default: a new name in the request's output_dir


class Pipeline:
    """A task's models, planned once and kept loaded between generations as the plan allows.

    Args:
        request: what every generation starts from (task, checkpoint, plan options; prompt optional).
        progress: True shows progress (rich bars on a terminal, one updating line in a notebook), False is
            silent, a callable receives the event dicts.
        reuse: keep components between generations (False: release each after use, as a one-shot run).
    """

    def __init__(self, request: Request, progress: bool | Progress = True, reuse: bool = True):
        # several GPUs (torchrun): every rank runs this; rank 0 plans, prints and writes, the others follow
        self.world = join(request.ulysses_size, request.device)
        self.leader = self.world is None or self.world.leader
        self.request, self.progress, self.reuse = request, progress if self.leader else False, reuse
        self.machine = machine_for(request)  # measured once: later plans see the memory free before loading
        self.job: Job | None = self._resolve(request, self.machine)  # the files and the fit, checked now
        self.components = Components()
        self._first = True  # the first generate of the unchanged request runs the job resolved above

    @property
    def loads(self):
        """How many times each component has been read from its files (a Counter)."""
        return self.components.loads

    def generate(self, prompt: str | None = None, *, save: bool = True, output: str | Path | None = NEW_FILE,
                 progress: bool | Progress | None = None, **options) -> GenerationResult:
        """Generate one video. Keyword options are `Request` fields (seed, image, size, frames, steps, shift,
        guide_scale, solver, negative_prompt, lora, cache, quant, ...; the official names such as `base_seed`
        and `frame_num` too). `save=False` or `output=None` returns the frames without writing a file;
        `output` names the mp4 (default: a new name in `output_dir`)."""
        if prompt is not None:
            options["prompt"] = prompt
        request = request_with(self.request, **options)
        saved = resumable(request, save, output)
        if saved is not None and request.seed < 0:  # a random seed was drawn for the file: it is the seed now
            request = replace(request, seed=saved.seed)
        if self._first and request == self.request and self.job is not None and saved is None:
            job = self.job
        else:
            job = self._resolve(request, self.machine)
        self._first = False
        self.job = job
        path = None if not save or output is None or not self.leader else (
            Path(saved.output) if saved is not None and output == NEW_FILE and request.save_file is None
            else output_path(request, job.settings) if output == NEW_FILE else Path(output))
        if path is not None and path.suffix.lower() != ".mp4":
            raise WanliteError(f"output={str(path)!r} must end in .mp4 (or pass save=False for frames only)")
        check_save_file(path, request.overwrite)
        if saved is not None:
            job = self.job = with_saved_prompt(job, saved)
            check_job(saved, job)
        with display(self.progress if progress is None else progress) as emit:
            if saved is not None:
                emit({"event": "warning", "message": f"resuming from {saved.file} after "
                      f"{saved.checkpoint.where()} (delete it to start over)"})
            if saved is None:  # the extender runs once per generation (on rank 0), before any re-plan
                job = self.job = self._on_leader(lambda: extend_job(job, emit))
            result = self._execute(request, job, path, emit, saved)
        if saved is not None and saved.file != (None if path is None else resume_path(path)):
            saved.file.unlink(missing_ok=True)  # used up (the one beside the output went when it was written)
        return result

    def _resolve(self, request: Request, machine) -> Job:
        return self._on_leader(lambda: resolve(request, machine, reuse=self.reuse))

    def _on_leader(self, compute):
        """`compute()` here, or on several GPUs rank 0's result on every rank (a decision made once, the same
        everywhere); its error stops every rank with the same line."""
        if self.world is None:
            return compute()
        outcome, failure = None, None
        if self.leader:
            try:
                outcome = ("ok", compute())
            except Exception as exc:  # the others are told before rank 0 raises, so none waits for a peer
                failure = exc
                outcome = ("error", str(exc) if isinstance(exc, WanliteError) else
                           f"rank 0 failed ({type(exc).__name__}: {exc})", getattr(exc, "exit_code", 1))
        outcome = share(outcome, self.world)
        if failure is not None:
            raise failure
        if outcome[0] == "error":
            error = WanliteError(outcome[1])
            error.exit_code = outcome[2]
            raise error
        return outcome[1]

    def _execute(self, request: Request, job: Job, path: Path | None, emit: Progress,
                 saved: Saved | None) -> GenerationResult:
        """Execute `job`; out of memory in a step or the decode: free, re-plan with the memory free now, say
        so, and resume from the last finished step, at most MAX_REPLANS times."""
        checkpoint = None if saved is None else saved.checkpoint
        replans = 0
        while True:
            try:
                return execute(job, path, emit, request.preview, self.components, checkpoint)
            except OutOfMemory as exc:
                if self.world is not None:  # one rank cannot re-plan alone: stop, with the resume file
                    raise
                if replans == MAX_REPLANS:
                    tail = "" if exc.resume_file is None else (
                        f"; free memory on the device and resume with --resume {exc.resume_file}")
                    raise OutOfMemory(f"out of memory again after re-planning {MAX_REPLANS} times ({exc}){tail}",
                                      exc.resume_file) from None
                checkpoint, message = exc.checkpoint, str(exc)
            replans += 1
            free_device_memory()
            machine = machine_for(request)  # measured now, with the step's memory given back
            planned = with_placement(job, resolve(replace(request, seed=job.settings.seed), machine,
                                                  reuse=self.reuse))
            free = (f"{machine.vram_free / GB:.1f} GB of VRAM free" if machine.gpu else
                    f"{machine.ram_available / GB:.1f} GB of RAM free")
            emit({"event": "warning", "message": f"{message}; re-planned for {free}: "
                  f"{placement_changes(job, planned)}; resuming"
                  + ("" if checkpoint is None else f" after {checkpoint.where()}")})
            job = self.job = planned

    def close(self) -> None:
        """Free every loaded component."""
        self.components.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resumable(request: Request, save: bool, output) -> Saved | None:
    """The resume file this generation continues from: `request.resume`, else the one beside a named output
    (the same command again finds it)."""
    if request.resume is not None:
        return read_checkpoint(Path(request.resume))
    named = None if not save or output is None else (
        Path(request.save_file) if output == NEW_FILE and request.save_file is not None
        else None if output == NEW_FILE else Path(output))
    if named is not None and resume_path(named).is_file():
        return read_checkpoint(resume_path(named))
    return None


def free_device_memory() -> None:
    """What an out-of-memory error left behind goes back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def display(progress: bool | Progress | None):
    """A context manager giving the event callback for `progress` (see `Pipeline`)."""
    from wanlite.pipelines.progress import ProgressDisplay

    if callable(progress):
        return nullcontext(progress)
    if progress:
        return ProgressDisplay(sys.stdout)
    return nullcontext(lambda event: None)


def load(request: Request | None = None, progress: bool | Progress = True, **options) -> Pipeline:
    """Plan a task once and keep its models loaded between `generate` calls.

    Example:
        >>> import wanlite
        >>> pipe = wanlite.load(task="ti2v-5B", ckpt_dir="Wan2.2-TI2V-5B")
        >>> first = pipe.generate(prompt="a red fox in the snow", seed=1)
        >>> again = pipe.generate(prompt="a red fox in the rain", seed=1, save=False)  # frames only
    """
    return Pipeline(base_request(request, options), progress)


def generate(request: Request | None = None, progress: bool | Progress = True, **options) -> GenerationResult:
    """Generate one video and write it as mp4: a pipeline that keeps nothing, `load(...).generate()`.

    Example:
        >>> from wanlite import generate
        >>> result = generate(task="ti2v-5B", prompt="a red square moving right", ckpt_dir="Wan2.2-TI2V-5B")
        >>> result.path, result.frames.shape
    """
    with Pipeline(base_request(request, options), progress, reuse=False) as pipe:
        return pipe.generate()


def base_request(request: Request | None, options: dict) -> Request:
    if request is None:
        if "task" not in options:
            raise WanliteError("pass task=... (one of wanlite.TASKS)")
        request = Request(task=options.pop("task"), prompt="")
    return request_with(request, **options)
