"""User-facing errors: one line naming the problem and the fix; the CLI prints them and exits 2."""


class WanliteError(Exception):
    """A problem with the user's input (flags, files, checkpoints); never a bug in wanlite."""

    exit_code = 2


class CheckpointError(WanliteError):
    """A checkpoint file or folder that is missing, damaged, unsafe or for another model."""


class NumericalOverflow(WanliteError):
    """The computation left the range of its number format (fp16 above 65504): stopped before any frame is
    written, with the precision that avoids it."""

    exit_code = 1
