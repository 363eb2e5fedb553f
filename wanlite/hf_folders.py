"""transformers folders (the umT5 tokenizer, wav2vec2) are loaded as data only, never as code.

A folder whose config names its own classes (`auto_map`, the `trust_remote_code` mechanism) would make
transformers offer to run the `.py` files beside it — on a terminal it asks "[y/N]" and `y` executes them.
wanlite refuses such a folder before transformers sees it, and passes `trust_remote_code=False` as well.
"""
from __future__ import annotations

import json
from pathlib import Path

from wanlite.errors import CheckpointError

# the files transformers reads `auto_map` from (AutoConfig, AutoTokenizer, AutoFeatureExtractor, AutoProcessor, ...)
CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "feature_extractor_config.json", "image_processor_config.json", "video_preprocessor_config.json")


def refuse_remote_code(folder: Path, what: str) -> None:
    """CheckpointError when any transformers config in `folder` asks for custom code (`auto_map`)."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(f"{path}: the {what}'s {name} is not readable JSON; download it again") from None
        if isinstance(config, dict) and "auto_map" in config:
            raise CheckpointError(f"{path}: the {what} asks to run its own Python code (auto_map); wanlite never "
                                  f"runs checkpoint code: use the official {what} files")
