"""Safetensors files whose matmul weights are stored scaled: ComfyUI `fp8_scaled` (the `scaled_fp8` sentinel
with `.scale_weight`, or the newer `.weight_scale` + `.comfy_quant`), kijai's plain fp8 casts (no scales), and
wanlite's own int8 layout (`.weight` int8 + `.weight_scale` fp32 per output row, written by `wanlite convert`).

The source hides the scale keys, so the model-side key check sees the usual Wan names; scaled weights arrive
as `QuantizedWeight`s and stay in their format unless a different `--quant` asks otherwise.
"""
from __future__ import annotations

import torch

from wanlite.errors import CheckpointError
from wanlite.loading.stream import SafetensorsSource
from wanlite.quant.base import QuantizedWeight
from wanlite.quant.fp8 import QTYPE_OF

WEIGHT_SCALES = ("scale_weight", "weight_scale")  # legacy ComfyUI name, new ComfyUI / wanlite name
IGNORED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant", "weight_scale_2")
SENTINEL = "scaled_fp8"
STORED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)


def _suffix(key: str) -> str:
    return key.rpartition(".")[2]


def is_scaled(source: SafetensorsSource) -> bool:
    """Does this safetensors checkpoint hold fp8 / int8 matmul weights (with or without scale tensors)?"""
    dtypes = source.dtypes()
    return any(_suffix(k) in WEIGHT_SCALES + (SENTINEL,) or dtypes[k] in STORED_DTYPES for k in dtypes)


class ScaledSafetensorsSource(SafetensorsSource):
    def __init__(self, files):
        super().__init__(files)
        self.scale_keys: dict[str, str] = {}  # weight key -> its scale key
        sentinel = None
        for key in list(self.owner):
            suffix = _suffix(key)
            if suffix == SENTINEL:
                sentinel = self.owner.pop(key).info(key)
            elif suffix in WEIGHT_SCALES:
                self.scale_keys[key[: -len(suffix)] + "weight"] = key
            elif suffix in IGNORED_SUFFIXES:
                self.owner.pop(key)
        # a 2-element sentinel means "full-precision matmuls only" (ComfyUI's convention)
        self.fast_matmul = sentinel is None or sentinel.nbytes // sentinel.dtype.itemsize != 2
        expects_scales = sentinel is not None or bool(self.scale_keys)
        dtypes = SafetensorsSource.dtypes(self)
        for key, dtype in dtypes.items():
            if dtype in STORED_DTYPES and key not in self.scale_keys and (expects_scales or dtype == torch.int8):
                raise CheckpointError(
                    f"{self.owner[key].path}: {key!r} is stored as {str(dtype).replace('torch.', '')} but has no "
                    f"scale ({key[:-len('weight')]}scale_weight / weight_scale); the file is damaged or was cut "
                    "short, re-download or re-convert it")
        for weight_key, scale_key in list(self.scale_keys.items()):
            if weight_key not in self.owner:
                raise CheckpointError(f"{self.owner[scale_key].path}: scale {scale_key!r} has no weight "
                                      f"{weight_key!r}; the file is damaged")
            self.owner.pop(scale_key)
        self._stored = {k for k, d in dtypes.items() if d in STORED_DTYPES and k in self.owner}
        self.scales = self._read_scales()  # tiny (one value per row); read up front, never mid-stream

    def _read_scales(self) -> dict[str, torch.Tensor]:
        scales = {}
        for shard in self.files:
            with shard:
                for weight_key, scale_key in self.scale_keys.items():
                    if scale_key in shard.keys():
                        scales[weight_key] = shard.read(scale_key).float().reshape(-1)
        return scales

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: torch.bfloat16 if k in self._stored else d for k, d in super().dtypes().items()}

    def quantized_keys(self) -> set[str]:
        return {k for k in self._stored if len(self.owner[k].info(k).shape) == 2}

    def read_quantized(self, key: str) -> QuantizedWeight:
        shard = self.owner[key]
        with shard:
            qdata = shard.read(key)
        scale = self.scales.get(key)
        if scale is not None and scale.numel() not in (1, qdata.shape[0]):
            raise CheckpointError(f"{self.owner[key].path}: the scale of {key!r} has {scale.numel()} values; "
                                  f"expected 1 or {qdata.shape[0]} (one per output row)")
        if qdata.dtype == torch.int8:
            return QuantizedWeight("int8", "int8", tuple(qdata.shape), qdata, scale)
        return QuantizedWeight("fp8", QTYPE_OF[qdata.dtype], tuple(qdata.shape), qdata, scale, self.fast_matmul)

    def fill(self, plan):
        for key, out in super().fill(plan):
            scale = self.scales.get(key)
            if scale is not None:  # a scaled weight loaded dense (`--quant none`, or a non-matmul tensor)
                out.mul_(scale.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1))) if scale.numel() > 1
                         else scale.to(out.dtype))
            yield key, out
