"""Safetensors files whose matmul weights are stored scaled or block-quantized: ComfyUI `fp8_scaled` (the
`scaled_fp8` sentinel with `.scale_weight`), ComfyUI's mixed-precision files (per-layer `.comfy_quant` JSON and/or
the `_quantization_metadata` header entry: float8, int8_tensorwise with or without ConvRot, mxfp8, nvfp4), kijai's
plain fp8 casts (no scales), and wanlite's own int8 layout (`.weight` int8 + `.weight_scale` fp32 per output row).

The source hides the scale and marker keys, so the model-side key check sees the usual Wan names. fp8 and plain
int8 weights arrive as `QuantizedWeight`s and stay in their format unless `--quant` asks otherwise; formats no
kernel here runs (mxfp8, nvfp4, ConvRot int8) are dequantized while they are read, into the dtype the plan asks
for, and quantized again by the handler when a `--quant` config is given.

What ComfyUI stores, read from its code (Comfy-Org/ComfyUI `comfy/ops.py` `MixedPrecisionOps.Linear.
_load_from_state_dict`, `comfy/utils.py convert_old_quants`; Comfy-Org/comfy-kitchen `comfy_kitchen/tensor/{fp8,
int8,mxfp8,nvfp4}.py` `state_dict_tensors`, `backends/eager/quantization.py` and `float_utils.py`):
- `comfy_quant`: uint8 bytes of a JSON object {"format": ..., "full_precision_matrix_mult": bool, "convrot": bool,
  "convrot_groupsize": int} (convrot keys may also sit under "params"); `_quantization_metadata` (header
  metadata) is {"layers": {layer: that object}} and, when present, wins over the sentinel;
- nvfp4: `weight` uint8 [rows, cols/2], two E2M1 codes a byte, the first element in the high nibble;
  `weight_scale` e4m3 per 16 values, `weight_scale_2` fp32 per tensor: w = e2m1 · block · tensor;
- mxfp8: `weight` e4m3, `weight_scale` E8M0 (2^(e-127), 0 for e = 0) per 32 values: w = fp8 · block;
- block scales are kept in cuBLAS's tiled order (`to_blocked`: 128 x 4 tiles, rows split in 4 bands of 32);
- int8_tensorwise: `weight` int8, `weight_scale` per tensor or [rows, 1]; with ConvRot the stored matrix is
  W·Hᵀ per group of `convrot_groupsize` input columns (H: the normalized Kronecker power of the regular 4 x 4
  Hadamard, `int8_utils._build_hadamard`), so w = (q · scale)·H per group (H is symmetric and orthogonal).
"""
from __future__ import annotations

import math

import torch

from wanlite.errors import CheckpointError
from wanlite.loading.safetensors_file import parse_header_json
from wanlite.loading.stream import SafetensorsSource
from wanlite.quant.base import QuantizedWeight
from wanlite.quant.fp8 import QTYPE_OF

WEIGHT_SCALES = ("scale_weight", "weight_scale")  # legacy ComfyUI name, new ComfyUI / wanlite name
IGNORED_SUFFIXES = ("scale_input", "input_scale")  # static activation scales: only for fp8 GEMM kernels
MARKER = "comfy_quant"
SENTINEL = "scaled_fp8"
STORED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
DECODED_FORMATS = ("mxfp8", "nvfp4", "int8_convrot")  # read dense: no kernel here runs them
READABLE = (*FP8_FORMATS, "int8_tensorwise", "mxfp8", "nvfp4")
MAX_MARKER_BYTES = 1 << 16
FLOAT_SCALES = (torch.float32, torch.bfloat16, torch.float16)
E8M0_DTYPES = (torch.uint8, torch.float8_e8m0fnu)  # ComfyUI views either as float8_e8m0fnu
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
REGULAR_H4 = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])


def _suffix(key: str) -> str:
    return key.rpartition(".")[2]


def _layer(key: str) -> str:
    return key.rpartition(".")[0]


def is_scaled(source: SafetensorsSource) -> bool:
    """Does this safetensors checkpoint hold quantized matmul weights (scaled, marked, or plain fp8 / int8)?"""
    dtypes = source.dtypes()
    return ("_quantization_metadata" in source.metadata()
            or any(_suffix(k) in WEIGHT_SCALES + (SENTINEL, MARKER) or dtypes[k] in STORED_DTYPES for k in dtypes))


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def untile_scales(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS's tiled order back to [rows, cols]: the file holds tiles of 128 rows x 4 columns,
    each written as 32 lines of (4 row bands x 4 columns)."""
    row_tiles, col_tiles = _ceil(rows, 128) // 128, _ceil(cols, 4) // 4
    t = tiled.reshape(row_tiles, col_tiles, 32, 4, 4)  # [tile row, tile col, line, band, column]
    t = t.permute(0, 3, 2, 1, 4)  # -> [tile row, band, line, tile col, column]
    return t.reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def regular_hadamard(size: int) -> torch.Tensor:
    """The orthonormal regular Hadamard matrix of `size` (a power of 4) that ComfyUI's ConvRot rotates with."""
    h = REGULAR_H4
    while h.shape[0] < size:
        h = torch.kron(h, REGULAR_H4)
    return h / math.sqrt(size)


def dequantize_nvfp4(packed: torch.Tensor, block: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    rows, cols = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(rows, cols).long()
    scales = untile_scales(block.view(torch.float8_e4m3fn).reshape(-1), rows, cols // 16).float()
    values = E2M1[codes].reshape(rows, cols // 16, 16) * (scales * tensor_scale.float().reshape(())).unsqueeze(-1)
    return values.reshape(rows, cols)


def dequantize_mxfp8(data: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    rows, cols = data.shape
    exponents = untile_scales(block.view(torch.uint8).reshape(-1), rows, cols // 32).to(torch.int32)
    scales = torch.where(exponents == 0, 0.0, torch.exp2((exponents - 127).float()))
    return (data.float().reshape(rows, cols // 32, 32) * scales.unsqueeze(-1)).reshape(rows, cols)


def dequantize_int8_convrot(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = q.shape
    w = q.float() * (scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(()))
    return (w.reshape(rows, cols // group, group) @ regular_hadamard(group)).reshape(rows, cols)


class ScaledSafetensorsSource(SafetensorsSource):
    def __init__(self, files):
        super().__init__(files)
        dtypes = SafetensorsSource.dtypes(self)
        infos = {k: s.info(k) for k, s in self.owner.items()}
        by_layer: dict[str, dict[str, str]] = {}  # layer -> {suffix: key} for every scale / marker key
        sentinel = None
        for key in list(self.owner):
            suffix = _suffix(key)
            if suffix == SENTINEL:
                sentinel = infos[key]
                self.owner.pop(key)
            elif suffix in WEIGHT_SCALES + IGNORED_SUFFIXES + (MARKER, "weight_scale_2"):
                by_layer.setdefault(_layer(key), {})[suffix] = key
        # a 2-element sentinel means "full-precision matmuls only" (ComfyUI's convention)
        fast_default = sentinel is None or sentinel.nbytes // sentinel.dtype.itemsize != 2
        confs = self._layer_configs(by_layer, sentinel is not None)
        self.scale_keys: dict[str, str] = {}  # weight key -> its (per-tensor or per-row) scale key
        self.formats_of: dict[str, str] = {}  # weight key -> ComfyUI format, for marked layers
        self.fast: dict[str, bool] = {}
        self.decoded: dict[str, tuple[str, dict]] = {}  # weight key -> (format, its extra keys / options)
        for layer, keys in by_layer.items():
            weight_key = f"{layer}.weight"
            if weight_key not in self.owner:
                raise CheckpointError(f"{self.owner[next(iter(keys.values()))].path}: "
                                      f"{next(iter(keys.values()))!r} has no weight {weight_key!r}; the file is "
                                      "damaged, re-download it")
            conf = confs.get(layer)
            self.fast[weight_key] = fast_default and not (conf or {}).get("full_precision_matrix_mult", False)
            if conf is None:
                scale = next((keys[s] for s in WEIGHT_SCALES if s in keys), None)
                if scale is not None:
                    self.scale_keys[weight_key] = scale
            else:
                self._check_layer(layer, conf, keys, infos)
        for keys in by_layer.values():
            for key in keys.values():
                self.owner.pop(key)
        expects_scales = sentinel is not None or bool(self.scale_keys) or bool(confs)
        for key, dtype in dtypes.items():
            if (key in self.owner and dtype in STORED_DTYPES and key not in self.scale_keys
                    and key not in self.decoded and (expects_scales or dtype == torch.int8)):
                raise CheckpointError(
                    f"{self.owner[key].path}: {key!r} is stored as {str(dtype).replace('torch.', '')} but has no "
                    f"scale ({key[:-len('weight')]}scale_weight / weight_scale); the file is damaged or was cut "
                    "short, re-download or re-convert it")
        self._stored = {k for k, d in dtypes.items()
                        if d in STORED_DTYPES and k in self.owner and k not in self.decoded}
        self.scales = self._read_scales()  # tiny (one value per row); read up front, never mid-stream

    def _layer_configs(self, by_layer: dict[str, dict[str, str]], has_sentinel: bool) -> dict[str, dict]:
        """Each marked layer's ComfyUI config: `_quantization_metadata` when the header has it (ComfyUI then
        ignores the sentinel), else the per-layer `.comfy_quant` tensors."""
        where = self.paths[0]
        confs: dict[str, dict] = {}
        for layer, keys in by_layer.items():
            if MARKER in keys:
                confs[layer] = self._read_marker(keys[MARKER])
        raw = self.metadata().get("_quantization_metadata")
        if raw is None:
            return confs
        try:
            layers = parse_header_json(raw.encode("utf-8")).get("layers")
        except (ValueError, AttributeError):  # bounded JSON (no 5000-digit integers, no deep nesting)
            layers = None
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise CheckpointError(f"{where}: its _quantization_metadata header entry is not {{\"layers\": {{name: "
                                  "{...}}}}; the file is damaged or was written by a broken tool, re-download it")
        weights = {_layer(k): k for k in self.owner if _suffix(k) == "weight"}
        for name, conf in layers.items():
            layer = name if name in weights else next(
                (w for w in weights if w.endswith("." + name) or name.endswith("." + w)), None)
            if layer is None:
                raise CheckpointError(f"{where}: _quantization_metadata names layer {name!r}, which the file does "
                                      "not hold; the file is damaged, re-download it")
            confs[layer] = conf
            by_layer.setdefault(layer, {})
        return confs

    def _read_marker(self, key: str) -> dict:
        shard = self.owner[key]
        info = shard.info(key)
        if info.dtype != torch.uint8 or len(info.shape) != 1 or info.nbytes > MAX_MARKER_BYTES:
            raise CheckpointError(f"{shard.path}: {key!r} is not a ComfyUI layer marker (uint8 JSON bytes, "
                                  "1-D); the file is damaged, re-download it")
        with shard:
            raw = shard.read(key).numpy().tobytes().rstrip(b"\x00")
        try:
            conf = parse_header_json(raw)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            conf = None
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            raise CheckpointError(f"{shard.path}: {key!r} is not a JSON object with a \"format\"; the file is "
                                  "damaged, re-download it")
        return conf

    def _check_layer(self, layer: str, conf: dict, keys: dict[str, str], infos) -> None:
        """Validate one marked layer's weight and scales against its format, before any data is read."""
        weight_key = f"{layer}.weight"
        path = self.owner[weight_key].path
        fmt = conf.get("format")
        if fmt not in READABLE:
            raise CheckpointError(
                f"{path}: layer {layer!r} is stored as ComfyUI {fmt!r}, which wanlite cannot read (it reads "
                f"{', '.join(READABLE)}); use a bf16, fp8_scaled or GGUF file of this model instead")
        weight = infos[weight_key]
        want = {"int8_tensorwise": torch.int8, "nvfp4": torch.uint8, "mxfp8": torch.float8_e4m3fn}.get(fmt) \
            or FP8_FORMATS.get(fmt)
        if weight.dtype != want or len(weight.shape) != 2:
            raise CheckpointError(f"{path}: layer {layer!r} is marked {fmt} but its weight is "
                                  f"{str(weight.dtype).replace('torch.', '')} {list(weight.shape)} (a 2-D "
                                  f"{str(want).replace('torch.', '')} matrix expected); the file is damaged")
        rows, cols = weight.shape
        scale_key = keys.get("weight_scale") or keys.get("scale_weight")

        def need(key: str | None, name: str, numels: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> str:
            info = infos.get(key) if key else None
            if info is None or info.dtype not in dtypes or info.nbytes // info.dtype.itemsize not in numels:
                got = "missing" if info is None else (f"{str(info.dtype).replace('torch.', '')} "
                                                     f"{list(info.shape)}")
                raise CheckpointError(f"{path}: layer {layer!r} ({fmt}) needs a {name} of "
                                      f"{' or '.join(map(str, numels))} values, found {got}; the file is damaged "
                                      "or was cut short, re-download it")
            return key

        if fmt in FP8_FORMATS:
            self.scale_keys[weight_key] = need(scale_key, "weight_scale", (1,), FLOAT_SCALES)
            self.formats_of[weight_key] = fmt
        elif fmt == "int8_tensorwise":
            need(scale_key, "weight_scale", (1, rows), FLOAT_SCALES)
            params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
            if conf.get("convrot", params.get("convrot", False)):
                group = conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))
                if not (isinstance(group, int) and group >= 4 and (group & (group - 1)) == 0
                        and math.log(group, 4) % 1 == 0 and cols % group == 0):
                    raise CheckpointError(f"{path}: layer {layer!r} has convrot_groupsize {group!r}; ConvRot "
                                          f"needs a power of 4 that divides its {cols} input features; the file "
                                          "is damaged")
                self.decoded[weight_key] = ("int8_convrot", {"scale": scale_key, "group": group})
                self.formats_of[weight_key] = "int8_convrot"
            else:
                self.scale_keys[weight_key] = scale_key
                self.formats_of[weight_key] = fmt
        elif fmt == "mxfp8":
            if cols % 32:
                raise CheckpointError(f"{path}: layer {layer!r} (mxfp8) has {cols} columns, not a multiple of "
                                      "its 32-value blocks; the file is damaged")
            tiles = _ceil(rows, 128) * _ceil(cols // 32, 4)
            block = need(keys.get("weight_scale"), "weight_scale (E8M0 block scales)", (tiles,), E8M0_DTYPES)
            self.decoded[weight_key] = ("mxfp8", {"block": block})
            self.formats_of[weight_key] = fmt
        else:  # nvfp4
            if (cols * 2) % 16:
                raise CheckpointError(f"{path}: layer {layer!r} (nvfp4) has {cols * 2} columns, not a multiple "
                                      "of its 16-value blocks; the file is damaged")
            tiles = _ceil(rows, 128) * _ceil(cols * 2 // 16, 4)
            block = need(keys.get("weight_scale"), "weight_scale (e4m3 block scales)", (tiles,),
                         (torch.float8_e4m3fn, torch.uint8))
            tensor = need(keys.get("weight_scale_2"), "weight_scale_2 (tensor scale)", (1,), FLOAT_SCALES)
            self.decoded[weight_key] = ("nvfp4", {"block": block, "tensor": tensor})
            self.formats_of[weight_key] = fmt

    def _read_scales(self) -> dict[str, torch.Tensor]:
        scales = {}
        for shard in self.files:
            with shard:
                for weight_key, scale_key in self.scale_keys.items():
                    if scale_key in shard.keys():
                        scales[weight_key] = shard.read(scale_key).float().reshape(-1)
        return scales

    def _read_raw(self, key: str) -> torch.Tensor:
        shard = next(s for s in self.files if key in s.keys())
        with shard:
            return shard.read(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().shapes()
        for key, (fmt, _) in self.decoded.items():
            if fmt == "nvfp4":  # two values a byte
                shapes[key] = (shapes[key][0], shapes[key][1] * 2)
        return shapes

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: torch.bfloat16 if k in self._stored or k in self.decoded else d
                for k, d in super().dtypes().items()}

    def formats(self) -> dict[str, str]:
        return {**super().formats(), **self.formats_of}

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
        return QuantizedWeight("fp8", QTYPE_OF[qdata.dtype], tuple(qdata.shape), qdata, scale,
                               self.fast.get(key, True))

    def dequantize(self, key: str) -> torch.Tensor:
        """A block-quantized / rotated weight read and dequantized to fp32 (the formats no kernel runs here)."""
        fmt, parts = self.decoded[key]
        data = self._read_raw(key)
        if fmt == "nvfp4":
            return dequantize_nvfp4(data, self._read_raw(parts["block"]), self._read_raw(parts["tensor"]))
        if fmt == "mxfp8":
            block = self._read_raw(parts["block"])
            if (block.view(torch.uint8) == 255).any():  # E8M0's NaN
                raise CheckpointError(f"{self.owner[key].path}: {key!r} has NaN block scales; the file is "
                                      "damaged, re-download it")
            return dequantize_mxfp8(data, block)
        return dequantize_int8_convrot(data, self._read_raw(parts["scale"]), parts["group"])

    def fill(self, plan):
        plain = [item for item in plan if item[0] not in self.decoded]
        for key, out in super().fill(plain):
            scale = self.scales.get(key)
            if scale is not None:  # a scaled weight loaded dense (`--quant none`, or a non-matmul tensor)
                out.mul_(scale.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1))) if scale.numel() > 1
                         else scale.to(out.dtype))
            yield key, out
        for key, shape, dtype in plan:
            if key in self.decoded:
                weight = self.dequantize(key)
                if tuple(weight.shape) != tuple(shape):
                    raise CheckpointError(f"{self.owner[key].path}: {key!r} decodes to {tuple(weight.shape)}, "
                                          f"expected {tuple(shape)}; the file is damaged")
                yield key, weight.to(dtype)
                del weight
