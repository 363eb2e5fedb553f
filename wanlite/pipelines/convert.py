"""`wanlite convert`: quantize a task's transformer(s) once into a file wanlite (and ComfyUI) loads fast.

Outputs: fp8 as ComfyUI safetensors that both of ComfyUI's loaders read (see `_SafetensorsOut`), int8 in
wanlite's layout (`<layer>.weight` int8 + `<layer>.weight_scale`
fp32 per output row), GGUF as city96 lays it out (arch `wan`, original key names, 5-D F32 patch embedding,
F32 vectors and modulation, bf16 embeddings and head). Tensors are read, quantized and written one at a time;
each file is written under a temporary name (`wanlite.files`) and renamed only when complete; a failed
write (a full disk) removes it and is one line, and the next convert removes those a killed one left.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import expert_components, prepare_dit
from wanlite.loading.stream import check_against
from wanlite.loading.writers import SafetensorsStreamWriter
from wanlite.files import clean_stale, closed, opened, temp_name
from wanlite.quant.base import is_quantizable
from wanlite.quant.fp8 import fp8_from_hp
from wanlite.quant.gguf_dequant import BLOCKS
from wanlite.quant.gguf_quantize import quantize as gguf_quantize
from wanlite.quant.gguf_quantize import type_for_row
from wanlite.quant.int8 import int8_from_hp

TARGETS = ("fp8", "int8", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q4_k", "gguf-q4_0")
COMFY_PREFIX = "model.diffusion_model."
# general.file_type (gguf-py's LlamaFileType name) per GGUF target. wanlite writes every block weight in the one
# type, which for the K-quants is llama.cpp's "_S" recipe as city96's patch applies it to Wan (its "_M" recipes
# lift self_attn.v and ffn.2 to Q6_K); llama.cpp's fallback types for odd rows don't change the label.
GGUF_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K", "Q5_K": "MOSTLY_Q5_K_S", "Q4_K": "MOSTLY_Q4_K_S",
                   "Q4_0": "MOSTLY_Q4_0"}
Progress = Callable[[int, int, str], None]  # (bytes read so far, total bytes, what)


@dataclass(frozen=True)
class Conversion:
    path: Path
    role: str
    source_bytes: int
    output_bytes: int


def _suffix(to: str) -> str:
    return ".gguf" if to.startswith("gguf") else ".safetensors"


def output_paths(task: str, roles: tuple[str, ...], to: str, out: Path) -> dict[str, Path]:
    """One file per expert; `out` is a folder, or the file itself for single-model tasks."""
    out = Path(out)
    if len(roles) == 1 and out.suffix.lower() == _suffix(to):
        return {roles[0]: out}
    if out.suffix.lower() in (".gguf", ".safetensors"):
        raise WanliteError(f"--out {out}: {task} has {len(roles)} experts and --to {to} writes "
                           f"{_suffix(to)} files; pass a folder (both experts are written into it)")
    kind, size = task.split("-")[0], task.split("-")[-1]
    return {role: out / f"wan2.2_{kind}_{'' if role == 'main' else role + '_'}{size}_{to}{_suffix(to)}"
            for role in roles}


def _gguf_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """city96's choices: vectors, tiny tensors, modulation and the 5-D patch embedding in F32; the
    quantizable block weights in `qtype` (llama.cpp's fallback type, else BF16, where a row does not split
    into its blocks); the rest BF16."""
    numel = int(np.prod(shape))
    if len(shape) != 2 or numel <= 1024 or name.endswith("modulation"):
        return "F32"
    if is_quantizable(name, shape):
        return type_for_row(qtype, shape[-1]) or "BF16"
    return "BF16"


def _gguf_bytes(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return tensor.float().contiguous().numpy()
    if qtype == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return gguf_quantize(tensor, qtype).numpy()


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    values, nbytes = BLOCKS[qtype]
    return int(np.prod(shape)) // values * nbytes


class _GGUFOut:
    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], qtype: str):
        from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

        self.path, self.tmp = path, opened(temp_name(path))
        self.types = {name: _gguf_type(name, shape, qtype) for name, shape in entries}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = GGUFWriter(self.tmp, "wan")
        self.writer.add_quantization_version(2)
        self.writer.add_file_type(LlamaFileType[GGUF_FILE_TYPES[qtype]])
        for name, shape in entries:
            t = self.types[name]
            if t == "F32":
                self.writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, t))
            else:
                byte_shape = (*shape[:-1], shape[-1] // BLOCKS[t][0] * BLOCKS[t][1])
                self.writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shape, t),
                                            raw_dtype=GGMLQuantizationType[t])
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write_tensor_data(_gguf_bytes(tensor, self.types[name]))

    def close(self, ok: bool) -> None:
        try:
            self.writer.close()
            if ok:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
            closed(self.tmp)


# ComfyUI's per-layer marker, as `comfy/ops.py` writes it: the bytes of json.dumps({"format": ...}) as uint8
FP8_MARKER = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")), dtype=torch.uint8)


class _SafetensorsOut:
    """fp8: every block matmul as e4m3fn with its per-tensor fp32 scale under both names, plus the per-layer
    `comfy_quant` marker; every other tensor (the six embedding / time / head Linears included) bf16 or fp32,
    unmarked. Each reader takes what it knows (ComfyUI code read for this, Comfy-Org/ComfyUI):
    - current ComfyUI (`comfy/sd.py load_diffusion_model_state_dict` -> `comfy/utils.py convert_old_quants` ->
      `comfy/ops.py mixed_precision_ops`): a layer with a `comfy_quant` marker becomes a float8 QuantizedTensor
      scaled by `weight_scale`; an unmarked layer is loaded in the compute dtype, so the six stay bf16.
      (Without `_quantization_metadata` in the header, convert_old_quants turns the sentinel's `scale_weight`
      layers into the same markers, so both routes give the same model.)
    - legacy ComfyUI (before the mixed-precision ops; `model_detection.model_config_from_unet` reads the
      sentinel dtype, `ops.scaled_fp8_ops` builds *every* Linear with that dtype and `scale_weight` = 1 where
      the file has none, and `load_state_dict` copies each weight into it): the block layers load exactly; the
      six Linears are cast to fp8 there whatever the file stores (a `scale_weight` on a bf16 weight would be
      applied after that cast, and current ComfyUI would then read the unscaled values wrong), so no layout
      keeps them bf16 in legacy ComfyUI; update ComfyUI for full precision.
    - kijai's wrapper (`comfy_quant_linear.py is_comfy_quant_state_dict`) takes the markers the same way.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], to: str, stored: dict):

        self.to = to
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.quantized = {name for name, shape in entries if is_quantizable(name, shape)}
        for name, shape in entries:
            if name in self.quantized:
                if to == "fp8":
                    layer = COMFY_PREFIX + name[: -len("weight")]
                    plan += [(COMFY_PREFIX + name, torch.float8_e4m3fn, shape),
                             (layer + "weight_scale", torch.float32, ()), (layer + "scale_weight", torch.float32, ()),
                             (layer + "comfy_quant", torch.uint8, tuple(FP8_MARKER.shape))]
                else:
                    plan += [(name, torch.int8, shape), (name[: -len("weight")] + "weight_scale", torch.float32,
                                                         (shape[0],))]
            else:
                dtype = torch.float32 if stored[name] == torch.float32 else torch.bfloat16
                plan.append(((COMFY_PREFIX if to == "fp8" else "") + name, dtype, shape))
        if to == "fp8":  # ComfyUI's marker; an empty e4m3fn tensor means "fp8 matmuls allowed"
            plan.append((COMFY_PREFIX + "scaled_fp8", torch.float8_e4m3fn, (0,)))
        self.dtypes = {name: dtype for name, dtype, _ in plan}
        metadata = {"format": "pt", "wanlite.quant": to}
        writer = SafetensorsStreamWriter(path, plan, metadata)
        writer.tmp = self.tmp = opened(temp_name(path))  # pid-tagged, so a killed convert's file is cleaned up
        self.file = writer.__enter__()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        prefix = COMFY_PREFIX if self.to == "fp8" else ""
        if name in self.quantized:
            if self.to == "fp8":
                q = fp8_from_hp(tensor, "e4m3fn", granularity="tensor")
                layer = prefix + name[: -len("weight")]
                self.file.write(prefix + name, q.qdata)
                self.file.write(layer + "weight_scale", q.scale.reshape(()))
                self.file.write(layer + "scale_weight", q.scale.reshape(()))
                self.file.write(layer + "comfy_quant", FP8_MARKER)
            else:
                q = int8_from_hp(tensor)
                self.file.write(name, q.qdata)
                self.file.write(name[: -len("weight")] + "weight_scale", q.scale)
            return
        self.file.write(prefix + name, tensor.to(self.dtypes[prefix + name]))

    def close(self, ok: bool) -> None:
        try:
            if ok and self.to == "fp8":
                self.file.write(COMFY_PREFIX + "scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn))
            self.file.__exit__(None if ok else RuntimeError, None, None)
        finally:
            self.tmp.unlink(missing_ok=True)  # renamed on success; otherwise never left behind
            closed(self.tmp)


def convert(ckpt_dir: Path, task: str, to: str, out: Path, progress: Progress | None = None) -> list[Conversion]:
    """Quantize the task's transformer(s) found in `ckpt_dir` into `out` (see module docstring)."""

    if to not in TARGETS:
        raise WanliteError(f"--to {to!r} is unknown; choose one of {', '.join(TARGETS)}")
    experts = expert_components(discover(ckpt_dir), task)
    paths = output_paths(task, tuple(experts), to, out)
    prepared = {role: prepare_dit(comp, task) for role, comp in experts.items()}
    pairs = {}
    for role, prep in prepared.items():  # every expert checked before anything is written
        pairs[role], _ = check_against(prep.model, prep.source, prep.rename, prep.what)
    shapes_of = {role: prep.source.shapes() for role, prep in prepared.items()}
    dtypes_of = {role: prep.source.dtypes() for role, prep in prepared.items()}
    total = sum(int(np.prod(shapes_of[r][k])) * dtypes_of[r][k].itemsize for r in pairs for k, _ in pairs[r])
    done = 0
    results = []
    for role, prep in prepared.items():
        entries = [(name, tuple(shapes_of[role][key])) for key, name in pairs[role]]
        stored = {name: dtypes_of[role][key] for key, name in pairs[role]}
        paths[role].parent.mkdir(parents=True, exist_ok=True)
        clean_stale(paths[role].parent)  # what a killed convert left
        try:
            if to.startswith("gguf"):
                sink = _GGUFOut(paths[role], entries, to.removeprefix("gguf-").upper())
            else:
                sink = _SafetensorsOut(paths[role], entries, to, stored)
            ok = False
            try:
                for (key, name), (_, shape) in zip(pairs[role], entries):  # one tensor in RAM at a time
                    for _, tensor in prep.source.fill([(key, torch.Size(shape), torch.float32)]):
                        sink.write(name, tensor)
                    done += tensor.numel() * dtypes_of[role][key].itemsize
                    if progress:
                        progress(done, total, role)
                ok = True
            finally:
                sink.close(ok)
        except OSError as exc:  # a full disk, a read-only folder: nothing is left under the name
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            raise WanliteError(f"{paths[role]}: converting failed ({exc.strerror or exc}); nothing was saved"
                               + ("; free disk space or pass another --out" if full else "")) from None
        results.append(Conversion(paths[role], role, sum(p.stat().st_size for p in prep.source.paths),
                                  paths[role].stat().st_size))
    return results
