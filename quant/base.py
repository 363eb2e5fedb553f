"""The quantization seam: configs, the handler registry, `QLinear` and the one high-precision rule.

A format is a frozen config class plus a handler registered for it. `quantize_(model, config)` swaps every
targeted `nn.Linear` for what the handler returns; the model code never changes. wanlite's own formats (FP8,
GGUF) become a `QLinear` holding plain buffers `qdata` / `scale`, so offload, pinning and `save_file` see
ordinary tensors; INT8 is delegated to torchao / bitsandbytes / optimum-quanto.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Layers every released quantized Wan file keeps in bf16/fp32 (city96 GGUF, ComfyUI fp8_scaled, kijai): the
# modulation, the patch/text/time embeddings, the time projection, the head, norms, and (by shape) biases.
HIGH_PRECISION = re.compile(r"(^|\.)(modulation|patch_embedding|text_embedding|time_embedding|time_projection|"
                            r"head|img_emb|norm\w*|\w*embedding\w*|shared|relative_attention_bias)(\.|$)")
BLOCK = re.compile(r"^(blocks|encoder\.block)\.\d+\.")


def is_quantizable(name: str, shape) -> bool:
    """The one rule for every format: 2-D matmul weights inside the transformer blocks (the bulk of the
    model) are quantized; embeddings, norms, modulation, the head and biases stay high precision."""
    return (name.endswith(".weight") and len(shape) == 2 and BLOCK.match(name) is not None
            and HIGH_PRECISION.search(name[: -len(".weight")]) is None)


def targets_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and is_quantizable(f"{name}.weight", module.weight.shape)


@dataclass(frozen=True)
class QuantConfig:
    """Base of every weight-format config; `name` is what `--quant` and the plan print."""

    # True when the handler's module keeps no reference to the dense weight it is given, so the loader may
    # read that weight into a buffer it reuses for the next one
    drops_input = False

    @property
    def name(self) -> str:
        raise NotImplementedError

    def keeps(self, weight: QuantizedWeight) -> bool:
        """True when a weight that arrives already quantized is already in this format (no requantizing)."""
        return False


@dataclass(frozen=True)
class DenseConfig(QuantConfig):
    """`--quant none`: every weight in the compute dtype, pre-quantized files dequantized on load."""

    @property
    def name(self) -> str:
        return "none"


@dataclass
class QuantizedWeight:
    """A weight in one of wanlite's plain-buffer formats, as a file stores it or `from_hp` produced it."""

    family: str  # "fp8" | "gguf": which kernel table reads it
    qtype: str  # "e4m3fn" / "e5m2" | GGML type name ("Q4_K", "BF16", ...)
    shape: tuple[int, ...]  # logical torch shape [out, in]
    qdata: torch.Tensor
    scale: torch.Tensor | None = None
    fast_matmul: bool = True  # a ComfyUI file can forbid fp8 GEMMs (its 2-element `scaled_fp8` sentinel)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return KERNELS[self.family].dequantize(self.qdata, self.scale, self.qtype, self.shape, dtype)

    @property
    def nbytes(self) -> int:
        return self.qdata.nbytes + (0 if self.scale is None else self.scale.nbytes)


class Kernels:
    """How one family of `QLinear` weights is dequantized and multiplied."""

    def dequantize(self, qdata, scale, qtype, shape, dtype) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, module: QLinear, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize(module.qdata, module.scale, module.qtype, module.weight_shape, x.dtype)
        return F.linear(x, weight, None if module.bias is None else module.bias.to(x.dtype))


KERNELS: dict[str, Kernels] = {}
HANDLERS: dict[type, Callable[[nn.Linear, QuantConfig], nn.Module]] = {}


def register_quant(config_cls: type):
    """Register the function turning a materialized `nn.Linear` into its quantized replacement."""

    def wrap(fn):
        HANDLERS[config_cls] = fn
        return fn

    return wrap


class QLinear(nn.Module):
    """A Linear whose weight lives in plain buffers (`qdata`, optional `scale`) and is dequantized on the
    compute device inside `forward`, through the kernel table of its family."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_shape = tuple(weight.shape)
        self.family, self.qtype, self.fast_matmul = weight.family, weight.qtype, weight.fast_matmul
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.family, self.qtype, self.weight_shape, self.qdata, self.scale, self.fast_matmul)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return KERNELS[self.family].linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.family}:{self.qtype}, bias={self.bias is not None}")


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` around existing tensors (no init, no copy)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def build_linear(config: QuantConfig | None, weight: torch.Tensor | QuantizedWeight,
                 bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The module a Linear becomes once its weight has arrived from a file.

    `config=None` keeps a pre-quantized weight as stored; a weight in another format is dequantized to
    `dtype` first and then quantized by the config's handler (`DenseConfig` leaves it dense)."""
    if isinstance(weight, QuantizedWeight):
        if config is None or config.keeps(weight):
            return QLinear(weight, bias)
        weight = weight.dequantize(dtype)
    linear = linear_from(weight, bias)
    if config is None or isinstance(config, DenseConfig):
        return linear
    return HANDLERS[type(config)](linear, config)


# Elements per op in `scaled_cast` on the CPU: below torch's parallel grain size (32768) an op runs inline on
# its thread, and the few rows' fp32 scratch stays in cache between the upcast, divide, clamp and store.
SERIAL_ELEMS = 1 << 15


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |w| of each row, in fp32 (max and -min: no |w| temporary the size of the weight)."""
    return torch.maximum(weight.amax(dim=1), weight.amin(dim=1).neg()).float()


def _cast_rows(weight, scale, out, limit, round_, start, stop, step) -> None:
    scratch = torch.empty(min(step, stop - start), weight.shape[1], dtype=torch.float32, device=weight.device)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        buf = scratch[: b - a]
        buf.copy_(weight[a:b]).div_(scale[a:b])
        if round_:
            buf.round_()
        out[a:b].copy_(buf.clamp_(-limit, limit))


@functools.lru_cache(maxsize=1)
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="wanlite-quant")


def scaled_cast(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, limit: float,
                round_: bool = False) -> torch.Tensor:
    """out = cast(clamp(weight / scale, ±limit)), `scale` [rows, 1] or [1, 1] fp32: bit for bit the reference
    `(w.float() / scale).clamp(-limit, limit).to(out.dtype)` (`.round()` before the clamp when `round_`).

    On the CPU, blocks of rows go to torch.get_num_threads() threads, each working through a few rows per op
    (inline ops, cache-sized scratch). Whole-tensor fp32 temporaries were 4-10x slower, and a loop of
    multi-threaded small ops ends each in a thread barrier that, on a busy machine, waits for a descheduled
    thread: 83 MB/s against 613 MB/s for this with other processes on the cores."""
    rows, cols = weight.shape
    scale = scale.expand(rows, 1)
    if weight.device.type != "cpu":  # a GPU wants few, large launches
        _cast_rows(weight, scale, out, limit, round_, 0, rows, max(1, (1 << 24) // max(cols, 1)))
        return out
    step = max(1, SERIAL_ELEMS // max(cols, 1))
    per = max(step, -(-rows // (4 * torch.get_num_threads())))  # a few blocks per thread evens out stragglers
    jobs = [_workers().submit(_cast_rows, weight, scale, out, limit, round_, a, min(a + per, rows), step)
            for a in range(0, rows, per)]
    for job in jobs:
        job.result()
    return out


def on_fastest_device(quantize: Callable[..., QuantizedWeight], weight: torch.Tensor, *args) -> QuantizedWeight:
    """`quantize(weight, *args, device=...)` on the GPU when there is one and the weight is on the CPU (the
    absmax, divide and cast are memory-bound: a GPU does them at transfer speed), else where the weight lies;
    the result lands on the weight's device either way, with the same bytes."""
    if weight.device.type == "cpu" and torch.cuda.is_available():
        try:
            return quantize(weight, *args, device=torch.device("cuda"))
        except torch.cuda.OutOfMemoryError:
            pass  # the GPU is full (a model already on it): the CPU path gives the same result
    return quantize(weight, *args)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Quantize a built model's weights in place, in the spirit of torchao's `quantize_`.

    Args:
        model: a model with materialized weights (to quantize while loading, pass `quant=` to the loaders).
        config: `Fp8WeightConfig()`, `Int8WeightConfig(backend=...)`, `GGUFWeightConfig(qtype=...)`.
        filter_fn: `(module_name, module) -> bool`; defaults to the shared high-precision rule.

    Example:
        >>> quantize_(dit, Fp8WeightConfig())
    """
    if isinstance(config, DenseConfig):
        return model
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantization handler is registered for {type(config).__name__}")
    chosen = filter_fn or targets_linear
    for name, module in list(model.named_modules()):
        if chosen(name, module):
            set_submodule(model, name, handler(module, config))
    return model


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20·log10(‖ref‖ / ‖ref − approx‖)."""
    ref = reference.float()
    noise = (ref - approx.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))
