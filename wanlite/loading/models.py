"""Build each Wan component on `meta`, check the checkpoint belongs to the task, then stream its weights in."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import torch

from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import CheckpointSet, Component
from wanlite.loading.keymaps import dit_key_from_diffusers, strip_comfy_prefix
from wanlite.loading.stream import load_into, open_source
from wanlite.loading.vae_keymap import vae_key_from_diffusers
from wanlite.models.blocks import keeps_fp32
from wanlite.models.dit import WanDiT
from wanlite.specs import DIT_SPECS, MODEL_TYPE_CHANNELS, TASK_VAE, VAE_SPECS, DiTSpec, VAESpec

TASK_EXPERTS = {"t2v-A14B": ("high_noise", "low_noise"), "i2v-A14B": ("high_noise", "low_noise"),
                "ti2v-5B": ("main",)}
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def _dit_rename(comp: Component):
    return dit_key_from_diffusers if comp.naming == "diffusers" else strip_comfy_prefix


def _need(shapes: dict, key: str, where) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{where}: tensor {key!r} is missing; the file is incomplete or not a Wan DiT")
    return shapes[key]


def dit_spec_from_shapes(shapes: dict[str, tuple[int, ...]], config: dict, where) -> DiTSpec:
    """Read a DiT's hyper-parameters off its tensor shapes; heads come from config.json or head_dim 128."""
    dim, in_dim, *patch = _need(shapes, "patch_embedding.weight", where)
    out_features = _need(shapes, "head.head.weight", where)[0]
    out_dim = out_features // math.prod(patch)
    num_layers = 1 + max((int(m[1]) for k in shapes if (m := _BLOCK_INDEX.match(k))), default=-1)
    num_heads = config.get("num_heads") or config.get("num_attention_heads") or max(1, dim // 128)
    model_type = next((t for t, ch in MODEL_TYPE_CHANNELS.items() if ch == (in_dim, out_dim)), None)
    if model_type is None:
        raise CheckpointError(f"{where}: a DiT with {in_dim} input / {out_dim} output channels is not a Wan2.2 "
                              "t2v, i2v or ti2v model")
    return DiTSpec(
        model_type, dim=dim, ffn_dim=_need(shapes, "blocks.0.ffn.0.weight", where)[0], num_heads=int(num_heads),
        num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
        freq_dim=_need(shapes, "time_embedding.0.weight", where)[1],
        text_dim=_need(shapes, "text_embedding.0.weight", where)[1],
        text_len=int(config.get("text_len", 512)), patch_size=tuple(patch))


def _task_name_for(spec: DiTSpec) -> str:
    for name, known in DIT_SPECS.items():
        if known.model_type == spec.model_type:
            return name
    return spec.model_type


def load_dit(comp: Component, task: str, dtype: torch.dtype = torch.bfloat16) -> WanDiT:
    """Stream one DiT (or one A14B expert) into a meta-built WanDiT; weights land directly in `dtype`."""
    source = open_source(list(comp.files))
    rename = _dit_rename(comp)
    shapes = {rename(k): s for k, s in source.shapes().items()}
    spec = dit_spec_from_shapes(shapes, comp.config, comp.where)
    want = DIT_SPECS[task]
    if spec.model_type != want.model_type:
        raise CheckpointError(
            f"{comp.where}: holds a {_task_name_for(spec)} transformer ({spec.in_dim} in / {spec.out_dim} out "
            f"channels) but --task {task} needs {want.in_dim} in / {want.out_dim} out; use the {task} checkpoint")
    with torch.device("meta"):
        dit = WanDiT(spec)
    load_into(dit, source, rename, lambda name, _: torch.float32 if keeps_fp32(name) else dtype,
              f"{task} transformer")
    return dit.eval().requires_grad_(False)


def vae_spec_from_shapes(shapes: dict[str, tuple[int, ...]], where) -> VAESpec:
    enc_dim, in_ch = _need(shapes, "encoder.conv1.weight", where)[:2]
    version = {3: "2.1", 12: "2.2"}.get(in_ch)
    if version is None:
        raise CheckpointError(f"{where}: a VAE taking {in_ch} input channels is neither the Wan2.1 nor the Wan2.2 VAE")
    base = VAE_SPECS["vae" + version]
    dec_dim = _need(shapes, "decoder.conv1.weight", where)[0] // base.dim_mult[-1]
    z_dim = _need(shapes, "conv2.weight", where)[0]
    if z_dim != base.z_dim:
        raise CheckpointError(f"{where}: latent width {z_dim} does not match the Wan{version} VAE ({base.z_dim})")
    return replace(base, dim=enc_dim, dec_dim=dec_dim)


def load_vae(comp: Component, task: str, dtype: torch.dtype = torch.float32):
    """Stream a Wan VAE; the task decides which VAE version is acceptable."""
    from wanlite.models.vae import WanVAE

    source = open_source(list(comp.files))
    rename = vae_key_from_diffusers if comp.naming == "diffusers" else strip_comfy_prefix
    spec = vae_spec_from_shapes({rename(k): s for k, s in source.shapes().items()}, comp.where)
    want = VAE_SPECS[TASK_VAE[task]]
    if spec.version != want.version:
        raise CheckpointError(f"{comp.where}: is the Wan{spec.version} VAE but --task {task} decodes with the "
                              f"Wan{want.version} VAE (Wan{want.version}_VAE.pth)")
    with torch.device("meta"):
        vae = WanVAE(spec)
    load_into(vae, source, rename, lambda name, stored: dtype, f"Wan{spec.version} VAE")
    return vae.eval().requires_grad_(False)


def expert_components(ckpt: CheckpointSet, task: str) -> dict[str, Component]:
    """The DiT component(s) the task needs, by role; one clear error naming what is missing."""
    roles = TASK_EXPERTS[task]
    if roles == ("main",):
        if len(ckpt.dits) == 1:
            return {"main": next(iter(ckpt.dits.values()))}
        if not ckpt.dits:
            raise CheckpointError(f"{ckpt.root}: no Wan transformer weights found for {task} "
                                  "(expected diffusion_pytorch_model*.safetensors or a ComfyUI .safetensors file)")
        raise CheckpointError(f"{ckpt.root}: {len(ckpt.dits)} transformers found; {task} uses one — "
                              "point --ckpt_dir at a single model")
    missing = [r for r in roles if r not in ckpt.dits]
    if missing:
        role = missing[0].replace("_", "-")
        raise CheckpointError(
            f"{ckpt.root}: the {role} expert of {task} is missing (expected {missing[0]}_model/ shards, a diffusers "
            f"transformer{'' if missing[0] == 'high_noise' else '_2'}/ folder, or a file named *{missing[0]}*)")
    return {r: ckpt.dits[r] for r in roles}
