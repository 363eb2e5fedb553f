"""FP8 weights (e4m3fn / e5m2) with a per-output-channel or per-tensor fp32 scale: w ≈ qdata · scale.

Matmul: the weight is upcast to the activation dtype on the compute device (any GPU, CPU); on GPUs with FP8
tensor cores (sm ≥ 8.9) e4m3 weights go through `torch._scaled_mm` with a dynamic activation scale instead,
chosen at run time and never required.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wanlite.quant.base import (KERNELS, Kernels, QLinear, QuantConfig, QuantizedWeight, on_fastest_device,
                                register_quant, row_absmax, scaled_cast)

FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
QTYPE_OF = {dtype: name for name, dtype in FP8_DTYPES.items()}


@dataclass(frozen=True)
class Fp8WeightConfig(QuantConfig):
    """Weight-only FP8; `granularity` "channel" (one scale per output row) or "tensor" (ComfyUI's layout)."""

    dtype: str = "e4m3fn"
    granularity: str = "channel"
    drops_input = True

    def __post_init__(self):
        if self.dtype not in FP8_DTYPES or self.granularity not in ("channel", "tensor"):
            raise ValueError(f"Fp8WeightConfig(dtype={self.dtype!r}, granularity={self.granularity!r}): dtype is "
                             f"one of {', '.join(FP8_DTYPES)}, granularity 'channel' or 'tensor'")

    @property
    def name(self) -> str:
        return "fp8" if self.dtype == "e4m3fn" else f"fp8-{self.dtype}"

    def keeps(self, weight: QuantizedWeight) -> bool:
        return weight.family == "fp8" and weight.qtype == self.dtype


def fp8_from_hp(weight: torch.Tensor, dtype: str = "e4m3fn", granularity: str = "channel",
                device: torch.device | str | None = None) -> QuantizedWeight:
    """Scale each output row (or the whole tensor) so its largest magnitude lands on the format's maximum.

    Computed on `device` (default: where the weight lies; `--quant fp8` picks the GPU when there is one) and
    returned on the weight's device; `scaled_cast` keeps the temporaries to a small scratch per thread."""
    fp8 = FP8_DTYPES[dtype]
    fmax = torch.finfo(fp8).max
    w = weight if device is None else weight.to(device)
    amax = row_absmax(w)
    if granularity != "channel":
        amax = amax.amax()
    scale = (amax / fmax).clamp(min=1e-12).reshape(-1, 1)
    qdata = scaled_cast(w, scale, torch.empty(w.shape, dtype=fp8, device=w.device), fmax)
    return QuantizedWeight("fp8", dtype, tuple(weight.shape), qdata.to(weight.device),
                           scale.reshape(-1).to(weight.device))


def _scale_for(scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    if scale is None:
        return 1.0
    return scale.to(dtype).reshape(-1, 1) if scale.numel() > 1 else scale.to(dtype).reshape(())


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs: CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = x · (qdata·scale)ᵀ + b with both operands in e4m3: activations get a dynamic per-row scale (rowwise
    GEMM) when the weight has per-channel scales, one scale for the whole input otherwise (tensorwise)."""
    fp8 = torch.float8_e4m3fn
    x2 = x.reshape(-1, x.shape[-1])
    fmax = torch.finfo(fp8).max
    out_features = qdata.shape[0]
    w_scale = torch.ones((), device=x.device) if scale is None else scale.float().to(x.device)
    if w_scale.numel() > 1:
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / fmax).clamp(min=1e-12)  # [M, 1]
        b_scale = w_scale.reshape(1, out_features)  # [1, N]
    else:
        x_scale = (x2.abs().amax().float() / fmax).clamp(min=1e-12).reshape(())
        b_scale = w_scale.reshape(())
    xq = (x2.float() / x_scale).clamp(-fmax, fmax).to(fp8)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(xq, qdata.t(), scale_a=x_scale, scale_b=b_scale, out_dtype=out_dtype,
                         bias=None if bias is None else bias.to(out_dtype))
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


class Fp8Kernels(Kernels):
    def dequantize(self, qdata, scale, qtype, shape, dtype):
        return qdata.to(dtype) * _scale_for(scale, dtype)

    def linear(self, module: QLinear, x: torch.Tensor) -> torch.Tensor:
        if (module.fast_matmul and module.qtype == "e4m3fn" and scaled_mm_supported(x.device)
                and x.shape[-1] % 16 == 0 and module.out_features % 16 == 0):
            return scaled_mm_linear(x, module.qdata, module.scale, module.bias)
        # upcast, then apply the scale on whichever side is smaller (the output for short inputs)
        weight = module.qdata.to(x.dtype)
        scale = _scale_for(module.scale, x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        if x.numel() // x.shape[-1] < module.in_features:
            out = F.linear(x, weight)
            out = out * (scale.reshape(-1) if isinstance(scale, torch.Tensor) else scale)
            return out if bias is None else out + bias
        return F.linear(x, weight * scale, bias)


KERNELS["fp8"] = Fp8Kernels()


@register_quant(Fp8WeightConfig)
def _fp8_linear(linear, config: Fp8WeightConfig) -> QLinear:
    bias = None if linear.bias is None else linear.bias.detach()
    weight = linear.weight.detach()
    return QLinear(on_fastest_device(fp8_from_hp, weight, config.dtype, config.granularity), bias)
