"""User-facing errors: one line naming the problem and the fix; the CLI prints them and exits 2."""


class WanliteError(Exception):
    """A problem with the user's input (flags, files, checkpoints); never a bug in wanlite."""

    exit_code = 2


class CheckpointError(WanliteError):
    """A checkpoint file or folder that is missing, damaged, unsafe or for another model."""


class NumericalOverflow(WanliteError):
    """A denoising step gave NaN / Inf values (fp16 above 65504, a huge guide scale, a broken LoRA): stopped
    before any frame is written, naming the likely cause and its fix."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a generation (a KeyboardInterrupt, so a queue stops too): `signal_name` says
    which, `resume_file` holds the run state after the last finished step (None: nothing to resume). The CLI
    exits 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, signal_name: str = "SIGINT", resume_file=None, where: str = ""):
        super().__init__(message)
        self.signal_name, self.resume_file, self.where = signal_name, resume_file, where  # where: "at step 3/4"

    @property
    def exit_code(self) -> int:
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.signal_name, 130)


class OutOfMemory(WanliteError):
    """The device ran out of memory during a step or the decode, also after re-planning; the run state up to
    the last finished step is in `resume_file` (None: none was written)."""

    exit_code = 1

    def __init__(self, message: str, resume_file=None):
        super().__init__(message)
        self.resume_file = resume_file
