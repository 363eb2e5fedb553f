"""Build each Wan component on `meta`, check the checkpoint belongs to the task, then stream its weights in."""
from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wanlite.errors import CheckpointError
from wanlite.files import block_count
from wanlite.loading.checkpoints import CheckpointSet, Component
from wanlite.loading.keymaps import (animate_key_from_official, dit_key_from_diffusers,
                                     s2v_key_from_official, strip_comfy_prefix)
from wanlite.loading.stream import PthSource, SafetensorsSource, check_against, load_into, load_pairs, open_source
from wanlite.models.blocks import keeps_fp32
from wanlite.models.dit import WanDiT
from wanlite.quant.base import QuantConfig
from wanlite.specs import (DIT_SPECS, MODEL_TYPE_CHANNELS, TASKS, VAE_SPECS, AnimateSpec, DiTSpec, S2VSpec,
                           VAESpec)

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
# The architecture's limits, checked before anything is built from numbers a file declares: no released Wan DiT
# has more blocks than the 14B models and no width reaches 2^17 (the umT5's are in wanlite.models.t5).
MAX_DIT_LAYERS = max(spec.num_layers for spec in DIT_SPECS.values())
MAX_WIDTH = 1 << 17
MAX_VAE_RES_BLOCKS = 8  # per encoder stage; the released VAEs have 2
EXPERT_WINDOW = 64 * 1024  # bytes of one tensor compared between the two A14B experts: any trained weights differ


def _dit_rename(comp: Component):
    return dit_key_from_diffusers if comp.naming == "diffusers" else strip_comfy_prefix


def _need(shapes: dict, key: str, where, rank: int = 1, limit: int = MAX_WIDTH) -> tuple[int, ...]:
    """shapes[key], which must have at least `rank` dimensions, each 1..limit."""
    if key not in shapes:
        raise CheckpointError(f"{where}: tensor {key!r} is missing; the file is incomplete or not a Wan DiT")
    shape = tuple(shapes[key])
    if len(shape) < rank or not all(1 <= d <= limit for d in shape):
        raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, which no Wan model has; the file is "
                              "damaged or for another model")
    return shape


def _config_int(config: dict, key: str, default: int, where, low: int = 1, high: int = MAX_WIDTH) -> int:
    value = config.get(key)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(f"{where}: config.json's {key} {str(value)[:40]} is not an integer in {low}..{high}; "
                              "fix or re-download the config")
    return value


def dit_spec_from_shapes(shapes: dict[str, tuple[int, ...]], config: dict, where) -> DiTSpec:
    """Read a DiT's hyper-parameters off its tensor shapes; heads come from config.json or head_dim 128."""
    dim, in_dim, *patch = _need(shapes, "patch_embedding.weight", where, rank=5)
    if len(patch) != 3:
        raise CheckpointError(f"{where}: patch_embedding.weight has {2 + len(patch)} dimensions, not 5 (a 3-D conv)")
    out_features = _need(shapes, "head.head.weight", where, rank=2)[0]
    out_dim = out_features // math.prod(patch)
    num_layers = block_count(shapes, _BLOCK_INDEX, MAX_DIT_LAYERS, where, "block")
    if num_layers == 0:
        raise CheckpointError(f"{where}: holds no transformer blocks (blocks.0.*); the file is incomplete")
    num_heads = _config_int(config, "num_heads", 0, where) or _config_int(config, "num_attention_heads", 0, where) \
        or max(1, dim // 128)
    s2v = s2v_spec_from_shapes(shapes, config, num_layers, where)
    animate = animate_spec_from_shapes(shapes, num_layers, where)
    model_type = "s2v" if s2v else "animate" if animate else next(
        (t for t, ch in MODEL_TYPE_CHANNELS.items() if ch == (in_dim, out_dim)), None)
    if model_type is None:
        raise CheckpointError(f"{where}: a DiT with {in_dim} input / {out_dim} output channels is not a Wan2.2 "
                              "t2v, i2v or ti2v model")
    try:
        return DiTSpec(
            model_type, dim=dim, ffn_dim=_need(shapes, "blocks.0.ffn.0.weight", where, rank=2)[0],
            num_heads=num_heads, num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
            freq_dim=_need(shapes, "time_embedding.0.weight", where, rank=2)[1],
            text_dim=_need(shapes, "text_embedding.0.weight", where, rank=2)[1],
            text_len=_config_int(config, "text_len", 512, where, high=4096), patch_size=tuple(patch), s2v=s2v,
            animate=animate)
    except ValueError as exc:  # DiTSpec's own consistency checks (heads dividing dim, even head_dim)
        raise CheckpointError(f"{where}: {exc}; the config.json or the weights are damaged") from None


def animate_spec_from_shapes(shapes: dict[str, tuple[int, ...]], num_layers: int, where) -> AnimateSpec | None:
    """The Animate additions read off the (official-named) shapes, None for other DiTs; adapters follow every
    num_layers / adapters-th block (5 in the released model)."""
    if "face_encoder.out_proj.weight" not in shapes:
        return None
    adapters = sum(1 for k in shapes if re.match(r"^face_adapter\.fuser_blocks\.\d+\.linear1_q\.weight$", k))
    if not 0 < adapters <= num_layers or num_layers // (num_layers // adapters) != adapters:
        raise CheckpointError(f"{where}: {adapters} face adapters do not fit a {num_layers}-block Animate DiT")
    hidden = _need(shapes, "face_encoder.conv2.conv.weight", where)[0]
    resblocks = sum(1 for k in shapes if re.match(r"^motion_encoder\.enc\.net_app\.convs\.\d+\.conv1\.0\.weight$", k))
    if not 0 < resblocks <= 16:  # the released model has 7; 2^(n + 2) is the face crop side
        raise CheckpointError(f"{where}: {resblocks} motion encoder blocks do not fit an Animate DiT")
    last = _need(shapes, f"motion_encoder.enc.net_app.convs.{resblocks}.conv2.1.weight", where)
    return AnimateSpec(face_size=2 ** (resblocks + 2), face_width=last[0],
                       motion_dim=_need(shapes, "face_encoder.conv1_local.conv.weight", where, rank=2)[1],
                       motion_codes=_need(shapes, "motion_encoder.dec.direction.weight", where, rank=2)[1],
                       face_tokens=_need(shapes, "face_encoder.conv1_local.conv.weight", where)[0] // hidden,
                       face_hidden=hidden, face_every=num_layers // adapters,
                       clip_dim=_need(shapes, "img_emb.proj.1.weight", where, rank=2)[1])


def s2v_spec_from_shapes(shapes: dict[str, tuple[int, ...]], config: dict, num_layers: int, where) -> S2VSpec | None:
    """The S2V additions read off the (official-named) shapes, None for other DiTs. Which blocks the audio
    injectors follow comes from config.json (`audio_inject_layers`), else the released model's list."""
    if "casual_audio_encoder.weights" not in shapes:
        return None
    base = S2VSpec()
    injectors = sum(1 for k in shapes if re.match(r"^audio_injector\.injector\.\d+\.q\.weight$", k))
    layers = config.get("audio_inject_layers") or base.inject_layers
    if not (isinstance(layers, (list, tuple)) and all(type(i) is int and 0 <= i < MAX_DIT_LAYERS for i in layers)):
        raise CheckpointError(f"{where}: config.json's audio_inject_layers {str(layers)[:60]} is not a list of block "
                              "numbers; fix or re-download the config")
    layers = tuple(layers)
    if len(layers) != injectors or max(layers, default=0) >= num_layers:
        raise CheckpointError(f"{where}: {injectors} audio injectors do not fit audio_inject_layers {list(layers)} "
                              f"of a {num_layers}-block DiT; put the model's config.json next to its weights")
    local = _need(shapes, "casual_audio_encoder.encoder.conv1_local.conv.weight", where, rank=2)
    hidden = _need(shapes, "casual_audio_encoder.encoder.conv1_global.conv.weight", where)[0]
    return S2VSpec(audio_dim=local[1], audio_layers=_need(shapes, "casual_audio_encoder.weights", where, rank=2)[1],
                   audio_tokens=local[0] // hidden, inject_layers=layers,
                   cond_dim=_need(shapes, "cond_encoder.weight", where, rank=2)[1],
                   motion_frames=_config_int(config, "motion_frames", base.motion_frames, where, high=4096))


def _task_name_for(spec: DiTSpec) -> str:
    for name, known in DIT_SPECS.items():
        if known.model_type == spec.model_type:
            return name
    return spec.model_type


@dataclass
class Prepared:
    """A component built on meta with its opened source: check it (no data read) or load it."""

    model: torch.nn.Module
    source: SafetensorsSource | PthSource  # or a GGUF / scaled-weight source from wanlite.quant
    rename: Callable[[str], str | None]
    what: str

    def check(self) -> None:
        check_against(self.model, self.source, self.rename, self.what)

    def load(self, dtype_for: Callable[[str, torch.dtype], torch.dtype],
             quant: QuantConfig | None = None, lora=None) -> torch.nn.Module:
        load_into(self.model, self.source, self.rename, dtype_for, self.what, quant, lora)
        if lora is not None:
            lora.attach(self.model)
        return self.model.eval().requires_grad_(False)


def prepare_dit(comp: Component, task: str) -> Prepared:
    """Read the DiT's shapes, check it is the task's model type, build it on meta."""
    source = open_source(list(comp.files))
    rename = _dit_rename(comp)
    shapes = {rename(k): s for k, s in source.shapes().items()}
    spec = dit_spec_from_shapes(shapes, comp.config, comp.where)
    if spec.s2v is not None:  # its audio injectors are stored in one list, wanlite keeps them in their blocks
        base, layers = rename, spec.s2v.inject_layers
        rename = lambda key: s2v_key_from_official(base(key), layers)  # noqa: E731
    if spec.animate is not None:  # and so are Animate's face adapters
        base, every = rename, spec.animate.face_every
        rename = lambda key: animate_key_from_official(base(key), every)  # noqa: E731
    want = DIT_SPECS[TASKS[task].dit]
    if spec.model_type != want.model_type:
        raise CheckpointError(
            f"{comp.where}: holds a {_task_name_for(spec)} transformer ({spec.in_dim} in / {spec.out_dim} out "
            f"channels) but --task {task} needs {want.in_dim} in / {want.out_dim} out; use the {task} checkpoint")
    with torch.device("meta"):
        dit = WanDiT(spec)
    return Prepared(dit, source, rename, f"{task} transformer")


def load_dit(comp: Component, task: str, dtype: torch.dtype = torch.bfloat16,
             quant: QuantConfig | None = None, lora=None) -> WanDiT:
    """Stream one DiT (or one A14B expert) into a meta-built WanDiT; weights land directly in `dtype`, block
    matmul weights in the `quant` format (None: as the file stores them); `lora` (wanlite.lora.LoraSet) is
    merged on the way in or attached as runtime branches."""
    return prepare_dit(comp, task).load(lambda name, _: torch.float32 if keeps_fp32(name) else dtype, quant, lora)


def _kind(block) -> tuple[bool, bool]:
    """Blocks differ only by what follows them: an S2V audio injector, an Animate face adapter."""
    return block.audio_injector is not None, block.face_adapter is not None


class DiTPieces:
    """One DiT read piece by piece, for offload modes that never hold the whole model in RAM: "pre" (the
    embeddings before the blocks), "head", or block `i`, each materialized into a fresh module from the
    checkpoint (checked once, up front) in the same dtype and format `load_dit` gives."""

    def __init__(self, comp: Component, task: str, dtype: torch.dtype = torch.bfloat16,
                 quant: QuantConfig | None = None, lora=None):
        prepared = prepare_dit(comp, task)
        self.dtype_for = lambda name, _: torch.float32 if keeps_fp32(name) else dtype
        self.model = prepared.model  # stays on meta: the shell offload binds device views into
        for name, p in list(self.model.named_parameters()):  # the dtypes loading gives, so layouts match
            owner = self.model.get_submodule(name.rpartition(".")[0])
            owner._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(
                p.to(self.dtype_for(name, p.dtype)), requires_grad=False)
        # pristine copies, so reads never touch the shell: a plain block and one per extra it can carry
        self._templates = {_kind(b): copy.deepcopy(b) for b in reversed(self.model.blocks)}
        self.source, self.quant, self.lora = prepared.source, quant, lora
        self.pairs, _ = check_against(prepared.model, prepared.source, prepared.rename, prepared.what)
        self.where = comp.where

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def template(self, i: int) -> torch.nn.Module:
        """A pristine (meta) module shaped like block `i`; do not modify it, deep-copy it."""
        return self._templates[_kind(self.model.blocks[i])]

    def load(self, piece: str | int) -> torch.nn.Module:
        """A new module holding `piece`'s weights: block `i` as a WanBlock, "pre"/"head" as a module with the
        DiT's own child names (so its layout matches the shell's)."""
        holder = torch.nn.Module()
        if isinstance(piece, int):
            holder.blocks = torch.nn.ModuleDict({str(piece): copy.deepcopy(self.template(piece))})
            prefix = f"blocks.{piece}."
        else:
            names = ["head"] if piece == "head" else [n for n, _ in self.model.named_children()
                                                      if n not in ("blocks", "head")]
            for name in names:
                setattr(holder, name, copy.deepcopy(getattr(self.model, name)))
            prefix = tuple(n + "." for n in names)
        pairs = [(k, n) for k, n in self.pairs if n.startswith(prefix)]
        load_pairs(holder, self.source, pairs, {}, self.dtype_for, self.quant, self.lora)
        if self.lora is not None:
            self.lora.attach(holder)
        return holder.blocks[str(piece)] if isinstance(piece, int) else holder


def _ints(n: int):
    return lambda v: isinstance(v, list) and len(v) == n and all(type(x) is int and x > 0 for x in v)


def _numbers(positive: bool):
    return lambda v: isinstance(v, list) and all(
        type(x) in (int, float) and math.isfinite(x) and (x > 0 or not positive) for x in v)


# diffusers `AutoencoderKLWan` config.json fields that WanVAE follows: field -> (VAESpec field, accepts, what
# wanlite supports). Four stages keep the 8x (Wan2.1) / 16x (Wan2.2) spatial stride the task's latent grid is
# built on; two temporal downsamples keep the 4x temporal stride of wanlite's causal chunks of 4 frames.
VAE_CONFIG_FIELDS = {
    "dim_mult": ("dim_mult", _ints(4), "4 positive integers (four stages), e.g. [1, 2, 4, 4]"),
    "num_res_blocks": ("num_res_blocks", lambda v: type(v) is int and v > 0, "a positive integer, e.g. 2"),
    "temperal_downsample": ("temporal_downsample", lambda v: isinstance(v, list) and len(v) == 3 and all(
        type(x) is bool for x in v) and sum(v) == 2, "3 booleans, two of them true, e.g. [false, true, true]"),
    "attn_scales": (None, lambda v: v == [], "[] (no attention inside the stages, as in every released Wan VAE)"),
    "latents_mean": ("latent_mean", _numbers(False), "a list of numbers, one per latent channel"),
    "latents_std": ("latent_std", _numbers(True), "a list of positive numbers, one per latent channel"),
}


def vae_config_fields(config: dict, where) -> dict:
    """The VAESpec fields a diffusers VAE's config.json sets (absent ones keep the released values); one error
    naming the first field WanVAE cannot build."""
    fields = {}
    for key, (field, accepts, supported) in VAE_CONFIG_FIELDS.items():
        value = config.get(key)
        if value is None:
            continue
        if not accepts(value):
            shown = f"({len(value)} values)" if key.startswith("latents_") and isinstance(value, list) else \
                json.dumps(value)
            raise CheckpointError(f"{where}: {key} {shown} is not supported; wanlite builds Wan VAEs with "
                                  f"{key} {supported}")
        if field is not None:
            fields[field] = tuple(value) if isinstance(value, list) else value
    return fields


def _check_vae_widths(spec: VAESpec, where) -> None:
    """Wan2.2's parameter-free stage shortcuts fold 2x2 (x2 in time) into channels and average or repeat them,
    so each stage's widths must divide evenly (diffusers refuses to build the model otherwise)."""
    if spec.version != "2.2":
        return
    enc = [spec.dim * m for m in (1, *spec.dim_mult)]
    dec = [spec.dec_dim * m for m in (spec.dim_mult[-1], *spec.dim_mult[::-1])]
    last = len(spec.dim_mult) - 1
    for i in range(last + 1):
        down = 1 if i == last else 4 * (2 if spec.temporal_downsample[i] else 1)
        up = 1 if i == last else 4 * (2 if spec.temporal_downsample[::-1][i] else 1)
        if enc[i] * down % enc[i + 1] or (i < last and dec[i + 1] * up % dec[i]):
            raise CheckpointError(
                f"{where}: dim_mult {list(spec.dim_mult)} at widths {spec.dim} / {spec.dec_dim} does not fit the "
                "Wan2.2 VAE's stage shortcuts; wanlite supports stages whose widths divide evenly, e.g. [1, 2, 4, 4]")


def vae_spec_from_shapes(shapes: dict[str, tuple[int, ...]], where, fields: dict | None = None) -> VAESpec:
    """Read a VAE's widths and blocks per stage off its (official-named) shapes; `fields` (from a diffusers
    config.json, `vae_config_fields`) replaces the released stage layout and latent statistics."""
    enc_dim, in_ch = _need(shapes, "encoder.conv1.weight", where, rank=2)[:2]
    version = {3: "2.1", 12: "2.2"}.get(in_ch)
    if version is None:
        raise CheckpointError(f"{where}: a VAE taking {in_ch} input channels is neither the Wan2.1 nor the Wan2.2 VAE")
    fields = dict(fields or {})
    config_blocks = fields.pop("num_res_blocks", None)
    base = VAE_SPECS["vae" + version]
    z_dim = _need(shapes, "conv2.weight", where)[0]
    if z_dim != base.z_dim:
        raise CheckpointError(f"{where}: latent width {z_dim} does not match the Wan{version} VAE ({base.z_dim})")
    for field in ("latent_mean", "latent_std"):
        if field in fields and len(fields[field]) != z_dim:
            raise CheckpointError(f"{where}: config.json's latents_{field[7:]} has {len(fields[field])} values but "
                                  f"the Wan{version} VAE has {z_dim} latent channels; fix or drop the field")
    base = replace(base, **fields)
    dec_width = _need(shapes, "decoder.conv1.weight", where)[0]
    if dec_width % base.dim_mult[-1] or dec_width < base.dim_mult[-1]:
        fix = ("the config.json's dim_mult does not match the weights" if "dim_mult" in fields else
               "a VAE with other stage widths needs its diffusers config.json (dim_mult) beside the weights")
        raise CheckpointError(f"{where}: the decoder's first conv gives {dec_width} channels, which do not fit "
                              f"dim_mult {list(base.dim_mult)}; {fix}")
    # every encoder stage holds num_res_blocks residual blocks (the real VAEs 2, the bundled tiny ones fewer)
    blocks = sum(1 for k in shapes if k.startswith("encoder.downsamples.") and k.endswith("residual.0.gamma"))
    num_res_blocks, rest = divmod(blocks, len(base.dim_mult))
    if rest or not 0 < num_res_blocks <= MAX_VAE_RES_BLOCKS:
        raise CheckpointError(f"{where}: {blocks} encoder residual blocks do not fit a Wan{version} VAE")
    if config_blocks is not None and config_blocks != num_res_blocks:
        raise CheckpointError(f"{where}: config.json says num_res_blocks {config_blocks} but the weights hold "
                              f"{num_res_blocks} residual blocks per encoder stage; fix the config")
    spec = replace(base, dim=enc_dim, dec_dim=dec_width // base.dim_mult[-1], num_res_blocks=num_res_blocks)
    _check_vae_widths(spec, where)
    return spec


def prepare_vae(comp: Component, task: str) -> Prepared:
    """Read the VAE's shapes (and a diffusers config.json's stage layout), check it is the version the task
    decodes with, build it on meta."""
    from wanlite.loading.vae_keymap import RES_BLOCKS, is_wan22_diffusers, vae_key_from_diffusers
    from wanlite.models.vae import WanVAE

    source = open_source(list(comp.files))
    rename = strip_comfy_prefix
    fields = {}
    if comp.naming == "diffusers":
        config = comp.config if comp.config.get("_class_name", "AutoencoderKLWan") == "AutoencoderKLWan" else {}
        fields = vae_config_fields(config, comp.files[0].parent / "config.json")
        wan22, res_blocks = is_wan22_diffusers(source.shapes()), fields.get("num_res_blocks", RES_BLOCKS)
        rename = lambda key: vae_key_from_diffusers(key, wan22, res_blocks)  # noqa: E731
    spec = vae_spec_from_shapes({rename(k): s for k, s in source.shapes().items()}, comp.where, fields)
    want = VAE_SPECS[TASKS[task].vae]
    if spec.version != want.version:
        raise CheckpointError(f"{comp.where}: is the Wan{spec.version} VAE but --task {task} decodes with the "
                              f"Wan{want.version} VAE (Wan{want.version}_VAE.pth)")
    with torch.device("meta"):
        vae = WanVAE(spec)
    return Prepared(vae, source, rename, f"Wan{spec.version} VAE")


def load_vae(comp: Component, task: str, dtype: torch.dtype = torch.float32):
    """Stream a Wan VAE (fp32 by default, as the reference runs it)."""
    return prepare_vae(comp, task).load(lambda name, stored: dtype)


def prepare_t5(comp: Component) -> Prepared:
    """Read the umT5 encoder's shapes (official `.pth` or HF names), build transformers' UMT5 on meta."""
    from wanlite.models.t5 import build_umt5, t5_spec_from_shapes, umt5_name_from_official

    source = open_source(list(comp.files))
    rename = umt5_name_from_official if comp.naming == "official" else strip_comfy_prefix
    spec = t5_spec_from_shapes({rename(k): s for k, s in source.shapes().items()}, comp.where)
    with torch.device("meta"):
        model = build_umt5(spec)
    return Prepared(model, source, rename, "umT5 encoder")


def load_t5(comp: Component, dtype: torch.dtype = torch.bfloat16, quant: QuantConfig | None = None):
    """Stream the umT5 encoder into transformers' UMT5EncoderModel built on meta; every weight lands in `dtype`,
    block matmul weights in the `quant` format."""
    return prepare_t5(comp).load(lambda name, stored: dtype, quant)


def check_checkpoint(ckpt: CheckpointSet, task: str) -> list[tuple[str, Component, Prepared]]:
    """Every component `task` needs, found, recognised and shape-checked against the task (no data read)."""
    found = [(f"transformer ({role.replace('_', '-')})" if role != "main" else "transformer", comp,
              prepare_dit(comp, task)) for role, comp in expert_components(ckpt, task).items()]
    if ckpt.t5 is None:
        raise CheckpointError(f"{ckpt.root}: no umT5 text encoder found (models_t5_umt5-xxl-enc-bf16.pth, "
                              "a diffusers text_encoder/ folder or a ComfyUI umt5_xxl file)")
    if ckpt.vae is None:
        want = VAE_SPECS[TASKS[task].vae].version
        raise CheckpointError(f"{ckpt.root}: no VAE found (Wan{want}_VAE.pth, a diffusers vae/ folder or a "
                              "ComfyUI VAE file)")
    if ckpt.tokenizer is None:
        raise CheckpointError(f"{ckpt.root}: no umT5 tokenizer found; put the google/umt5-xxl tokenizer files "
                              "(tokenizer.json or spiece.model) in a folder inside it")
    found.append(("text encoder", ckpt.t5, prepare_t5(ckpt.t5)))
    found.append(("vae", ckpt.vae, prepare_vae(ckpt.vae, task)))
    for _, _, prepared in found:
        prepared.check()
    check_experts_differ({comp.role: prepared.source for label, comp, prepared in found
                          if label.startswith("transformer")})
    check_tokenizer(ckpt.tokenizer, found[-2][2].model.get_input_embeddings().num_embeddings)
    return found


def _largest_per_file(source) -> list[tuple[Path, str]]:
    """(file, its largest tensor) for each file of a DiT source: a weight matrix, which training always changes
    (a norm or a bias can keep its initial value in both experts). A .pth expert is never released: none."""
    if isinstance(source, SafetensorsSource):
        return [(f.path, max(f.tensors, key=lambda k: f.tensors[k].nbytes)) for f in source.files if f.tensors]
    if isinstance(source, PthSource) or not source.tensors:
        return []
    return [(source.path, max(source.tensors, key=lambda k: source.tensors[k].raw.nbytes))]  # a GGUF file


def _head_bytes(source, key: str) -> tuple[Path, bytes] | None:
    """The file holding `key` and the first EXPERT_WINDOW bytes of `key` as stored; None: no such tensor."""
    if isinstance(source, SafetensorsSource):
        shard = next((f for f in source.files if key in f.tensors), None)
        return None if shard is None else (shard.path, shard.raw_head(key, EXPERT_WINDOW))
    if isinstance(source, PthSource) or key not in source.tensors:
        return None
    return source.path, source.tensors[key].raw[:EXPERT_WINDOW].tobytes()


def check_experts_differ(sources: dict) -> None:
    """A file copied over from the other A14B expert has every right name and shape, so only its bytes show
    it: for each file of the high-noise expert, the first bytes of its largest tensor must differ from the
    same tensor of the low-noise expert. One bounded read per file and expert."""
    if set(sources) != {"high_noise", "low_noise"}:
        return
    high, low = sources["high_noise"], sources["low_noise"]
    for path, key in _largest_per_file(high):
        other = _head_bytes(low, key)
        if other is None:
            continue
        mine = _head_bytes(high, key)[1]
        # a constant run (zeros) says nothing about where the bytes came from
        if mine == other[1] and mine.count(mine[:1]) != len(mine):
            raise CheckpointError(f"{path}: holds the same bytes as the low-noise expert's {other[0]} (tensor "
                                  f"{key!r}); one was copied from the other expert, re-download both files")


def check_tokenizer(folder, vocab_size: int) -> None:
    """Load the tokenizer as `generate` will and check its ids fit the text encoder's embedding, so a damaged or
    mismatched tokenizer stops `check` too, not only a generation."""
    from wanlite.models.t5 import load_tokenizer, tokenizer_error

    tokenizer = load_tokenizer(folder)
    try:
        size = len(tokenizer)
        tokenizer("a check", add_special_tokens=True)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- as in load_tokenizer: a damaged vocabulary can fail here too
        raise tokenizer_error(folder, exc) from None
    if size > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {size} tokens but the text encoder embeds only "
                              f"{vocab_size}; the tokenizer belongs to another model")


def expert_components(ckpt: CheckpointSet, task: str) -> dict[str, Component]:
    """The DiT component(s) the task needs, by role; one clear error naming what is missing."""
    roles = TASKS[task].experts
    if roles == ("main",):
        if len(ckpt.dits) == 1:
            return {"main": next(iter(ckpt.dits.values()))}
        if not ckpt.dits:
            raise CheckpointError(f"{ckpt.root}: no Wan transformer weights found for {task} "
                                  "(expected diffusion_pytorch_model*.safetensors or a ComfyUI .safetensors file)")
        roles = " and ".join(sorted(r.replace("_", "-") for r in ckpt.dits))
        raise CheckpointError(f"{ckpt.root}: holds {len(ckpt.dits)} transformers ({roles}) but {task} uses one; "
                              "point --ckpt_dir at the folder of that model")
    missing = [r for r in roles if r not in ckpt.dits]
    if missing:
        role = missing[0].replace("_", "-")
        raise CheckpointError(
            f"{ckpt.root}: the {role} expert of {task} is missing (expected {missing[0]}_model/ shards, a diffusers "
            f"transformer{'' if missing[0] == 'high_noise' else '_2'}/ folder, or a file named *{missing[0]}*)")
    return {r: ckpt.dits[r] for r in roles}
