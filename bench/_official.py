"""Import modules of the official Wan2.2 code (a checkout of github.com/Wan-Video/Wan2.2) for one-off parity runs
on CPU: its package __init__ files (which import every pipeline) are not run, and its CUDA-only attention calls
are replaced by plain softmax attention that refuses any key masking (parity inputs never need it)."""
from __future__ import annotations

import argparse
import datetime
import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


def wan_attention(q, k, v, q_lens=None, k_lens=None, **_):
    """Stands in for `wan.modules.attention.flash_attention` ([B, L, H, D] in and out)."""
    if k_lens is not None and int(k_lens.min()) != k.shape[1]:
        raise RuntimeError("this parity harness does not mask keys")
    return _sdpa(q, k, v)


def load_official(root: Path, *names: str) -> list:
    """The official modules `names` (e.g. "wan.modules.s2v.model_s2v"), with `flash_attention` replaced."""
    for name in ("wan", "wan.modules", "wan.modules.s2v", "wan.modules.animate", "wan.distributed"):
        package = types.ModuleType(name)
        package.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = package
    model = importlib.import_module("wan.modules.model")
    model.flash_attention = wan_attention
    modules = [importlib.import_module(n) for n in names]
    for module in modules:
        if hasattr(module, "flash_attention"):
            module.flash_attention = wan_attention
    return modules


def revision(root: Path) -> str:
    run = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or "unknown (not a git checkout)"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def official_checkout(doc: str) -> Path:
    """The `--official PATH` argument of a parity script (its usage text: `doc`), resolved."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/Wan-Video/Wan2.2")
    return parser.parse_args().official.resolve()


def provenance(script: str, root: Path) -> dict:
    """What every parity result records first: the command, date, machine and the official revision."""
    from harness import machine

    return {"command": f"python bench/{script} --official PATH/TO/Wan2.2",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "official": {"repository": "github.com/Wan-Video/Wan2.2", "revision": revision(root)}}
