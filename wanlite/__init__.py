"""wanlite: the Wan2.2 video generation suite on consumer GPUs."""
import logging
import os
from pathlib import Path

import torch

from wanlite._version import __version__

# torchao (imported by transformers and the quant backends) tries to load CUDA-only extensions and logs two
# failures on every import with a CPU-only torch; skip them only when this torch has no CUDA at all.
if torch.version.cuda is None:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it would announce that skip on every import
# torchao registers Enums with pytree, which torch 2.13 reports as deprecated on every import: not actionable
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

# In a source checkout (or an editable install) `cli.py` lives beside the package folder; make it
# importable as `wanlite.cli`. An installed wheel carries wanlite/cli.py and skips this.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "cli.py").is_file():
    __path__.append(str(_checkout))

__all__ = ["__version__", "load", "Pipeline", "generate", "resolve", "execute", "Request", "Job", "TASKS"]


def __getattr__(name: str):
    # the public API, imported on first use so `import wanlite` stays light
    if name in ("load", "Pipeline", "generate", "resolve", "execute", "Request", "Job"):
        from wanlite.pipelines import job, pipeline, request, resolve, run

        return {"load": pipeline.load, "Pipeline": pipeline.Pipeline, "generate": pipeline.generate,
                "resolve": resolve.resolve, "execute": run.execute, "Request": request.Request,
                "Job": job.Job}[name]
    if name == "TASKS":
        from wanlite.specs import TASKS

        return TASKS
    raise AttributeError(f"module 'wanlite' has no attribute {name!r}")
