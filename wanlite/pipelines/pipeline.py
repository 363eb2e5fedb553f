"""`wanlite.load(...) -> Pipeline`: plan once, keep the models, generate many times.

    pipe = wanlite.load(task="ti2v-5B", ckpt_dir="Wan2.2-TI2V-5B")
    video = pipe.generate(prompt="a cat surfing", seed=3, save=False).frames

Each `generate` resolves its job against the machine as it was when the pipeline started (so what the models
already hold does not change the plan), executes it with the pipeline's `Components`, and keeps what the
job's `KeepPlan` says. Options that change the plan (size, frames, LoRAs, quant...) load again only the
component whose inputs changed, and say so. The one-shot `generate(...)` is a pipeline that keeps nothing.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

from wanlite.errors import WanliteError
from wanlite.pipelines.components import Components
from wanlite.pipelines.job import Job
from wanlite.pipelines.request import Request, request_with
from wanlite.pipelines.resolve import machine_for, resolve
from wanlite.pipelines.run import GenerationResult, Progress, execute, output_path

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
        self.request, self.progress, self.reuse = request, progress, reuse
        self.machine = machine_for(request)  # measured once: later plans see the memory free before loading
        self.job: Job | None = resolve(request, self.machine, reuse=reuse)  # the files and the fit, checked now
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
        if self._first and request == self.request and self.job is not None:
            job = self.job
        else:
            job = resolve(request, self.machine, reuse=self.reuse)
        self._first = False
        self.job = job
        path = None if not save or output is None else (
            output_path(request, job.settings) if output == NEW_FILE else Path(output))
        if path is not None and path.suffix.lower() != ".mp4":
            raise WanliteError(f"output={str(path)!r} must end in .mp4 (or pass save=False for frames only)")
        with display(self.progress if progress is None else progress) as emit:
            return execute(job, path, emit, request.preview, self.components)

    def close(self) -> None:
        """Free every loaded component."""
        self.components.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
