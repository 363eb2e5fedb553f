"""Quantized checkpoints written the way other tools write them (not by `wanlite convert`), for tests and
benches: a ComfyUI `fp8_scaled` file, ComfyUI mixed-precision files (nvfp4, mxfp8, ConvRot int8, float8 with
`comfy_quant` markers) and a city96-style GGUF made with `gguf.GGUFWriter` + `gguf.quants`."""
from __future__ import annotations

import json
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


# ---- ComfyUI mixed-precision files (`comfy_quant` markers), laid out as comfy-kitchen's layouts store them ----

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def comfy_marker(conf: dict) -> torch.Tensor:
    """A layer's `.comfy_quant` tensor: the UTF-8 bytes of its JSON config as uint8."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def tile_scales(scales: torch.Tensor) -> torch.Tensor:
    """[rows, cols] block scales into cuBLAS's tiled order (zero-padded to 128 x 4 tiles; each tile written as 32
    lines of 4 row bands x 4 columns), the order comfy-kitchen stores them in."""
    rows, cols = scales.shape
    prow, pcol = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros(prow, pcol, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    t = padded.reshape(prow // 128, 4, 32, pcol // 4, 4)  # [tile row, band, line, tile col, column]
    return t.permute(0, 3, 2, 1, 4).reshape(prow, pcol).contiguous()


def quantize_nvfp4(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """NVFP4: per-tensor fp32 scale amax/(448·6), e4m3 scale per 16 values, E2M1 codes two a byte (first value
    in the high nibble). Returns the stored tensors (suffix -> tensor) and the dense weight they encode."""
    rows, cols = w.shape
    w = w.float()
    tensor_scale = (w.abs().amax() / (448.0 * 6.0)).clamp(min=1e-12)
    blocks = w.reshape(rows, cols // 16, 16)
    block = (blocks.abs().amax(-1) / 6.0 / tensor_scale).clamp(max=448.0).to(torch.float8_e4m3fn)
    total = block.float() * tensor_scale
    scaled = torch.where(total.unsqueeze(-1) > 0, blocks / total.clamp(min=1e-30).unsqueeze(-1), 0.0)
    mag = (scaled.abs().unsqueeze(-1) - E2M1_GRID).abs().argmin(-1)  # nearest grid value
    codes = (mag + 8 * (scaled < 0)).to(torch.uint8).reshape(rows, cols)
    dense = (E2M1_GRID[mag] * torch.where(scaled < 0, -1.0, 1.0) * total.unsqueeze(-1)).reshape(rows, cols)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return {"weight": packed, "weight_scale": tile_scales(block),
            "weight_scale_2": tensor_scale.reshape(())}, dense


def quantize_mxfp8(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """MXFP8: e4m3 values with a power-of-two E8M0 exponent per 32 values (rounded up so the block fits)."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    amax = blocks.abs().amax(-1)
    exponent = (torch.ceil(torch.log2((amax / 448.0).clamp(min=2.0 ** -127))) + 127).clamp(0, 254)
    exponent = torch.where(amax == 0, 0.0, exponent)
    scale = torch.where(exponent == 0, 1.0, torch.exp2(exponent - 127))
    data = (blocks / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    dense = (data.float() * torch.where(exponent == 0, 0.0, scale).unsqueeze(-1)).reshape(rows, cols)
    return {"weight": data.reshape(rows, cols),
            "weight_scale": tile_scales(exponent.to(torch.uint8)).view(torch.float8_e8m0fnu)}, dense


def convrot_hadamard(size: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    four = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])
    while h.shape[0] < size:
        h = torch.kron(h, four)
    return h / size ** 0.5


def quantize_int8_convrot(w: torch.Tensor, group: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """int8_tensorwise with ConvRot: rotate each group of input columns (W·Hᵀ), then int8 per row ([rows, 1])."""
    rows, cols = w.shape
    h = convrot_hadamard(group)
    rotated = (w.float().reshape(rows, cols // group, group) @ h.T).reshape(rows, cols)
    scale = (rotated.abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-30)
    q = (rotated / scale).round().clamp(-128, 127).to(torch.int8)
    dense = ((q.float() * scale).reshape(rows, cols // group, group) @ h).reshape(rows, cols)
    return {"weight": q, "weight_scale": scale}, dense


def quantize_fp8_tensorwise(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    scale = (w.float().abs().amax() / 448.0).clamp(min=1e-12)
    data = (w.float() / scale).to(torch.float8_e4m3fn)
    return {"weight": data, "weight_scale": scale.reshape(())}, data.float() * scale


COMFY_QUANTIZERS = {"nvfp4": quantize_nvfp4, "mxfp8": quantize_mxfp8, "int8_convrot": quantize_int8_convrot,
                    "float8_e4m3fn": quantize_fp8_tensorwise}


def write_comfy_mixed(state: dict[str, torch.Tensor], path: Path, formats: dict[str, str], default: str | None,
                      header_metadata: bool = False, prefix: str = COMFY_PREFIX,
                      ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ComfyUI mixed-precision file: each block matmul weight in `formats.get(name, default)` (None: bf16,
    unmarked) with its scales and `comfy_quant` marker (`int8_convrot` is written as int8_tensorwise with
    "convrot": true); `header_metadata` also lists the layers in the `_quantization_metadata` header entry.
    Returns the path and the dense weights the quantized layers encode (by state-dict name)."""
    out, dense, layers = {}, {}, {}
    for name, t in state.items():
        fmt = formats.get(name, default) if name.startswith("blocks.") and name.endswith(".weight") \
            and t.dim() == 2 else None
        if fmt is None:
            out[prefix + name] = t if t.dtype == torch.float32 and t.dim() < 2 else t.to(torch.bfloat16)
            continue
        stored, dense[name] = COMFY_QUANTIZERS[fmt](t)
        layer = prefix + name[: -len(".weight")]
        for suffix, tensor in stored.items():
            out[f"{layer}.{suffix}"] = tensor
        conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256} if fmt == "int8_convrot" \
            else {"format": fmt}
        out[f"{layer}.comfy_quant"] = comfy_marker(conf)
        layers[layer] = conf
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if header_metadata else None
    save_safetensors(out, Path(path), metadata)
    return Path(path), dense
