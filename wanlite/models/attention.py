"""Attention with a pluggable backend slot: PyTorch SDPA everywhere, flash/sage only when importable."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q, k, v: [B, L, H, D] -> SDPA wants [B, H, L, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    dtype = q.dtype
    half = torch.bfloat16 if dtype not in (torch.float16, torch.bfloat16) else dtype
    return flash_attn_func(q.to(half), k.to(half), v.to(half)).to(dtype)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    dtype = q.dtype
    half = torch.bfloat16 if dtype not in (torch.float16, torch.bfloat16) else dtype
    return sageattn(q.to(half), k.to(half), v.to(half), tensor_layout="NHD").to(dtype)


# name -> (kernel, module that must be importable, needs CUDA tensors)
BACKENDS = {"sdpa": (_sdpa, None, False), "flash": (_flash, "flash_attn", True), "sage": (_sage, "sageattention", True)}
_active = "sdpa"


def available_backends() -> list[str]:
    return [name for name, (_, module, _) in BACKENDS.items() if module is None or importlib.util.find_spec(module)]


def active_backend() -> str:
    return _active


PACKAGES = {"flash": "flash-attn", "sage": "sageattention"}  # what to pip install for each optional kernel


def set_backend(name: str) -> None:
    """Select the attention kernel (`resolve` checked it is available: the job names it)."""
    global _active
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not available here; choose one of {available_backends()}")
    _active = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over [B, L, H, D] tensors with scale 1/sqrt(D) (official `attention()`)."""
    kernel, _, needs_cuda = BACKENDS[_active]
    if needs_cuda and not q.is_cuda:
        kernel = _sdpa
    return kernel(q, k, v)
