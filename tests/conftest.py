import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "wan_manifests.json"


@pytest.fixture(scope="session")
def manifests():
    if not MANIFESTS.is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS}")
    return json.loads(MANIFESTS.read_text())


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric used throughout."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())
