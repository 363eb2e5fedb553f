import json
import os
from pathlib import Path

import pytest

# torchao's CUDA-only extensions log load failures on every import on a CPU machine.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "wan_manifests.json"


@pytest.fixture(scope="session")
def manifests():
    if not MANIFESTS.is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS}")
    return json.loads(MANIFESTS.read_text())


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric used throughout."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
