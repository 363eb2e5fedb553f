"""diffusers `AutoencoderKLWan` key names <-> official Wan VAE names (both versions), table driven."""
from __future__ import annotations

import re

RES_BLOCKS = 2  # num_res_blocks of every released Wan VAE (diffusers' default); sets the official flat indices

_RESNET_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                 "conv2": "residual.6", "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_SIDE = {"conv_in": "conv1", "conv_out": "head.2", "norm_out.gamma": "head.0.gamma"}
_MID = {"resnets.0": "middle.0", "attentions.0": "middle.1", "resnets.1": "middle.2"}


def is_wan22_diffusers(keys) -> bool:
    """The Wan2.2 VAE groups encoder resnets per stage (`down_blocks.i.resnets.j`); Wan2.1's are flat."""
    return any(k.startswith("encoder.down_blocks.") and ".resnets." in k for k in keys)


def _resnet(rest: str) -> str:
    for part, official in _RESNET_PARTS.items():
        if rest.startswith(part):
            return official + rest[len(part):]
    return rest


def vae_key_from_diffusers(key: str, wan22: bool, res_blocks: int = RES_BLOCKS) -> str:
    """Official name of a diffusers VAE key; `wan22` picks the stage layout, `res_blocks` is the VAE's
    num_res_blocks (the official names number a stage's blocks and resample in one list)."""
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}"
    for part, official in _SIDE.items():
        if rest.startswith(part):
            return f"{top}.{official}{rest[len(part):]}"
    if m := re.match(r"mid_block\.(resnets\.\d|attentions\.\d)\.(.*)", rest):
        inner = m[2] if m[1].startswith("attentions") else _resnet(m[2])
        return f"{top}.{_MID[m[1]]}.{inner}"
    if m := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        i, tail = int(m[1]), m[2]
        if not wan22:
            return f"encoder.downsamples.{i}.{_resnet(tail)}"
        if r := re.match(r"resnets\.(\d+)\.(.*)", tail):
            return f"encoder.downsamples.{i}.downsamples.{r[1]}.{_resnet(r[2])}"
        return f"encoder.downsamples.{i}.downsamples.{res_blocks}.{tail.removeprefix('downsampler.')}"
    if m := re.match(r"up_blocks\.(\d+)\.(.*)", rest):
        i, tail = int(m[1]), m[2]
        per_stage = res_blocks + 1
        if r := re.match(r"resnets\.(\d+)\.(.*)", tail):
            j, inner = int(r[1]), _resnet(r[2])
            return (f"decoder.upsamples.{i}.upsamples.{j}.{inner}" if wan22
                    else f"decoder.upsamples.{i * (per_stage + 1) + j}.{inner}")
        if wan22:
            return f"decoder.upsamples.{i}.upsamples.{per_stage}.{tail.removeprefix('upsampler.')}"
        return f"decoder.upsamples.{i * (per_stage + 1) + per_stage}.{tail.removeprefix('upsamplers.0.')}"
    return key


def _resnet_to_diffusers(rest: str) -> str:
    for part, official in _RESNET_PARTS.items():
        if rest.startswith(official):
            return part + rest[len(official):]
    return rest


def vae_key_to_diffusers(key: str, wan22: bool, res_blocks: int = RES_BLOCKS) -> str:
    """diffusers name of an official VAE key (for writing diffusers-layout files); inverse of the above."""
    top, _, rest = key.partition(".")
    for diffusers_top, official in _TOP.items():
        if top == official:
            return f"{diffusers_top}.{rest}"
    for part, official in _SIDE.items():
        if rest.startswith(official):
            return f"{top}.{part}{rest[len(official):]}"
    if m := re.match(r"middle\.(\d)\.(.*)", rest):
        mid = {v: k for k, v in _MID.items()}[f"middle.{m[1]}"]
        inner = m[2] if mid.startswith("attentions") else _resnet_to_diffusers(m[2])
        return f"{top}.mid_block.{mid}.{inner}"
    per_stage = res_blocks + 1
    if wan22 and (m := re.match(r"(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", rest)):
        kind, i, j, inner = m[1], int(m[2]), int(m[3]), m[4]
        resamp = res_blocks if kind == "down" else per_stage
        if j == resamp:
            return f"{top}.{kind}_blocks.{i}.{kind}sampler.{inner}"
        return f"{top}.{kind}_blocks.{i}.resnets.{j}.{_resnet_to_diffusers(inner)}"
    if m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
        return f"encoder.down_blocks.{m[1]}.{_resnet_to_diffusers(m[2])}"
    if m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
        i, j = divmod(int(m[1]), per_stage + 1)
        if j == per_stage:
            return f"decoder.up_blocks.{i}.upsamplers.0.{m[2]}"
        return f"decoder.up_blocks.{i}.resnets.{j}.{_resnet_to_diffusers(m[2])}"
    return key
