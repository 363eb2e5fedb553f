"""Quantized checkpoints written the way other tools write them (not by `wanlite convert`), for tests and
benches: a ComfyUI `fp8_scaled` file and a city96-style GGUF made with `gguf.GGUFWriter` + `gguf.quants`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanlite.loading.writers import save_safetensors

COMFY_PREFIX = "model.diffusion_model."


def write_comfy_fp8_scaled(state: dict[str, torch.Tensor], path: Path, sentinel_elems: int = 0,
                           drop_scale: str | None = None) -> Path:
    """ComfyUI scaled fp8: every block matmul weight as e4m3fn with a per-tensor fp32 `scale_weight`
    (max|W| / 448), the rest fp16/fp32, all under `model.diffusion_model.`, plus the `scaled_fp8` marker."""
    out = {}
    for name, t in state.items():
        if name.startswith("blocks.") and name.endswith(".weight") and t.dim() == 2:
            scale = t.abs().max().float() / 448.0
            out[COMFY_PREFIX + name] = (t.float() / scale).to(torch.float8_e4m3fn)
            if name != drop_scale:
                out[COMFY_PREFIX + name[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[COMFY_PREFIX + name] = t if t.dtype == torch.float32 and t.dim() < 2 else t.half()
    out[COMFY_PREFIX + "scaled_fp8"] = torch.zeros(sentinel_elems, dtype=torch.float8_e4m3fn)
    save_safetensors(out, Path(path))
    return Path(path)


def write_gguf_with_gguf_py(state: dict[str, torch.Tensor], path: Path, qtype: str = "Q8_0",
                            arch: str = "wan", mixed: dict[str, str] | None = None) -> Path:
    """A Wan GGUF as city96's tools lay it out, written only with gguf-py: block matmul weights quantized with
    `gguf.quants.quantize` (`mixed` overrides the type per tensor), vectors / tiny tensors / modulation and the
    5-D patch embedding as F32, the remaining 2-D tensors as F16."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), arch)
    writer.add_quantization_version(2)
    for name, t in state.items():
        array = t.detach().float().numpy()
        if t.dim() != 2 or t.numel() <= 1024 or name.endswith("modulation"):
            writer.add_tensor(name, array.astype(np.float32))
        elif name.startswith("blocks.") and name.endswith(".weight"):
            kind = GGMLQuantizationType[(mixed or {}).get(name, qtype)]
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
