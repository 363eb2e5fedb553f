"""Weight-only INT8: torchao by default, bitsandbytes or optimum-quanto on request (`--quant-backend`).

Each backend is imported only when chosen; one that cannot run here fails with one line naming the backend,
the reason and the alternative. wanlite's own int8 file layout (`wanlite convert --to int8`) is read back as
a plain-buffer `QLinear` (symmetric per output row: w = qdata · scale).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from wanlite.errors import WanliteError
from wanlite.quant.base import KERNELS, Kernels, QuantConfig, QuantizedWeight, register_quant, row_absmax, scaled_cast

BACKENDS = ("torchao", "bnb", "quanto")


@dataclass(frozen=True)
class Int8WeightConfig(QuantConfig):
    backend: str = "torchao"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise WanliteError(f"--quant-backend {self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")

    @property
    def name(self) -> str:
        return "int8" if self.backend == "torchao" else f"int8-{self.backend}"


def int8_from_hp(weight: torch.Tensor, device: torch.device | str | None = None) -> QuantizedWeight:
    """Symmetric per-output-row int8 (the layout `wanlite convert --to int8` writes), computed on `device`
    (default: the weight's) and returned on the weight's device."""
    w = weight if device is None else weight.to(device)
    scale = (row_absmax(w) / 127).clamp(min=1e-12).reshape(-1, 1)
    qdata = scaled_cast(w, scale, torch.empty(w.shape, dtype=torch.int8, device=w.device), 127, round_=True)
    return QuantizedWeight("int8", "int8", tuple(weight.shape), qdata.to(weight.device),
                           scale.reshape(-1).to(weight.device))


class Int8Kernels(Kernels):
    def dequantize(self, qdata, scale, qtype, shape, dtype):
        return qdata.to(dtype) * scale.to(dtype).reshape(-1, 1)


KERNELS["int8"] = Int8Kernels()


def _unavailable(backend: str, exc: BaseException) -> WanliteError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    others = ", ".join(b for b in BACKENDS if b != backend)
    return WanliteError(f"--quant-backend {backend} cannot run on this machine ({first}); "
                        f"use --quant-backend {others.split(', ')[0]} (or one of: {others})")


def _torchao(linear: nn.Linear) -> nn.Module:
    if not torch.cuda.is_available():  # its two .so files are CUDA-only; skip the noisy failed loads
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        raise _unavailable("torchao", exc) from None
    ao_quantize(linear, Int8WeightOnlyConfig())
    return linear


def _bnb(linear: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001
        raise _unavailable("bnb", exc) from None
    device = linear.weight.device
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    try:
        return layer.to(device)  # bitsandbytes quantizes when the weight is moved to its device
    except Exception as exc:  # noqa: BLE001
        raise _unavailable("bnb", exc) from None


def _quanto(linear: nn.Linear) -> nn.Module:
    try:
        from optimum.quanto import freeze, qint8, quantize
    except Exception as exc:  # noqa: BLE001
        raise _unavailable("quanto", exc) from None
    holder = nn.Sequential(linear)  # quanto replaces children only
    quantize(holder, weights=qint8)
    freeze(holder)
    return holder[0]


_BACKEND_FNS = {"torchao": _torchao, "bnb": _bnb, "quanto": _quanto}


@register_quant(Int8WeightConfig)
def _int8_linear(linear: nn.Linear, config: Int8WeightConfig) -> nn.Module:
    return _BACKEND_FNS[config.backend](linear)
