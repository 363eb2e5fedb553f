"""The bundled tiny Wan models: procedural data, training, and the checkpoint folders they produce."""
from pathlib import Path

from wanlite.errors import WanliteError

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_dir(task: str) -> Path:
    """The bundled official-layout folder of `tiny-t2v` or `tiny-ti2v`."""
    folder = CHECKPOINTS / task
    if not (folder / "config.json").is_file() and not (folder / "high_noise_model").is_dir():
        raise WanliteError(f"the bundled {task} weights are missing at {folder}; "
                           "reinstall wanlite or rebuild them with `python -m wanlite.tiny.train`")
    return folder
