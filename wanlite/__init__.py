"""wanlite: the Wan2.2 video generation suite on consumer GPUs."""
from pathlib import Path

from wanlite._version import __version__

# In a source checkout (or an editable install) `cli.py` lives beside the package folder; make it
# importable as `wanlite.cli`. An installed wheel carries wanlite/cli.py and skips this.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "cli.py").is_file():
    __path__.append(str(_checkout))

__all__ = ["__version__"]
