"""GGUF weights in the DiT: raw quantized bytes as a `QLinear` buffer, dequantized at forward time on the
compute device by wanlite's torch kernels (`gguf_dequant`), and a tensor source that streams a Wan GGUF file
through the same loader as safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wanlite.errors import CheckpointError
from wanlite.quant.base import KERNELS, Kernels, QLinear, QuantConfig, QuantizedWeight, linear_from, register_quant
from wanlite.quant.gguf_dequant import dequantize
from wanlite.quant.gguf_file import read_gguf
from wanlite.quant.gguf_quantize import QUANTIZABLE, quantize, type_for_row

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class GGUFWeightConfig(QuantConfig):
    """Quantize to one GGML type (`--quant gguf-q4_k`); the bytes are the ones a GGUF file would hold."""

    qtype: str = "Q8_0"
    drops_input = True

    def __post_init__(self):
        if self.qtype not in QUANTIZABLE or self.qtype in FLOAT_TYPES:
            raise ValueError(f"GGUFWeightConfig(qtype={self.qtype!r}): choose one of "
                             f"{', '.join(q for q in QUANTIZABLE if q not in FLOAT_TYPES)}")

    @property
    def name(self) -> str:
        return "gguf-" + self.qtype.lower()

    def keeps(self, weight: QuantizedWeight) -> bool:
        return weight.family == "gguf" and weight.qtype == type_for_row(self.qtype, weight.shape[-1])


def gguf_from_hp(weight: torch.Tensor, qtype: str) -> QuantizedWeight:
    return QuantizedWeight("gguf", qtype, tuple(weight.shape), quantize(weight, qtype))


class GGUFKernels(Kernels):
    def dequantize(self, qdata, scale, qtype, shape, dtype):
        return dequantize(qdata, qtype, shape, dtype)


KERNELS["gguf"] = GGUFKernels()


@register_quant(GGUFWeightConfig)
def _gguf_linear(linear, config: GGUFWeightConfig):
    qtype = type_for_row(config.qtype, linear.in_features)
    bias = None if linear.bias is None else linear.bias.detach()
    if qtype is None:  # rows that split into no block size stay dense, as llama.cpp's converter keeps them
        return linear_from(linear.weight.detach().clone(), bias)  # a copy: the loader reuses what it was given
    return QLinear(gguf_from_hp(linear.weight.detach(), qtype), bias)


class GGUFSource:
    """A Wan GGUF file as a tensor source: float tensors fill destinations like any checkpoint, quantized
    ones arrive as `QuantizedWeight`s (their bytes copied out of the memory map, never dequantized on CPU)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.paths = [self.path]
        self.tensors = read_gguf(self.path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: FLOAT_TYPES.get(t.qtype, torch.bfloat16) for k, t in self.tensors.items()}

    def metadata(self) -> dict[str, str]:
        return {}

    def formats(self) -> dict[str, str]:
        return {k: t.qtype for k, t in self.tensors.items()}

    def quantized_keys(self) -> set[str]:
        return {k for k, t in self.tensors.items() if t.qtype not in FLOAT_TYPES}

    def read_quantized(self, key: str) -> QuantizedWeight:
        t = self.tensors[key]
        if len(t.shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {key!r} is stored as {t.qtype} but has shape {t.shape}; "
                                  "only 2-D matmul weights can stay quantized")
        rows = t.shape[0]
        qdata = torch.from_numpy(t.raw.reshape(rows, -1).copy())  # own the bytes: the map closes with the file
        return QuantizedWeight("gguf", t.qtype, t.shape, qdata)

    def fill(self, plan):
        for key, shape, dtype in plan:
            yield key, self.tensors[key].dequantize(dtype).reshape(shape)
