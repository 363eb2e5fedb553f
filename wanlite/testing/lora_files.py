"""Synthetic LoRA files in every key format wanlite reads (native kohya-suffix, native PEFT, kohya/musubi,
diffusers), written from one set of low-rank pairs so tests can check they all mean the same update."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
TO_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                "ffn.2": "ffn.net.2"}


def random_pairs(model: torch.nn.Module, rank: int = 4, seed: int = 0, scale: float = 0.05,
                 blocks: tuple[int, ...] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (down [rank, in], up [out, rank]) for every block Linear (or those of `blocks`)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in range(len(model.blocks)) if blocks is None else blocks:
        for name in LINEARS:
            full = f"blocks.{i}.{name}"
            module = model.get_submodule(full)
            out_f, in_f = getattr(module, "weight_shape", None) or module.weight.shape
            pairs[full] = (torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale)
    return pairs


def write_lora(path: Path, pairs: dict, fmt: str = "native", alpha: float | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> Path:
    """fmt: native (lora_down/up, `diffusion_model.` prefix) | peft (native names, lora_A/B) | kohya | diffusers.
    diffusers files carry no alpha (it is baked into the matrices, as diffusers saves them)."""
    tensors = {}
    for name, (down, up) in pairs.items():
        a = torch.tensor(float(alpha)) if alpha is not None else None
        if fmt == "native":
            key = f"diffusion_model.{name}"
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        elif fmt == "peft":
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
            key = name
        elif fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        elif fmt == "diffusers":
            block, i, rest = name.split(".", 2)
            key = f"transformer.{block}.{i}.{TO_DIFFUSERS[rest]}"
            scaled = up * (alpha / down.shape[0]) if alpha is not None else up
            tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": scaled}
            a = None
        else:
            raise ValueError(fmt)
        if a is not None:
            tensors[f"{key}.alpha"] = a
    tensors |= extra or {}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
