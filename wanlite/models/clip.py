"""The CLIP image encoder Animate-14B conditions on: the vision tower of open-clip XLM-RoBERTa-large ViT-H/14
(official `wan/modules/animate/clip.py`), run by transformers' `CLIPVisionModel` with the official checkpoint's
weights mapped onto it. Animate uses the hidden states after the first 31 of its 32 blocks (no final norm), so
the 32nd block is neither built nor loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wanlite.errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass(frozen=True)
class ClipVisionSpec:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    heads: int = 16
    mlp_ratio: int = 4
    layers_used: int = 31  # of 32: Animate reads the output of block 31

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


TINY_CLIP = ClipVisionSpec(image_size=28, patch_size=14, dim=64, heads=1, layers_used=2)  # heads as read back


def find_clip(root: Path) -> Path:
    """The CLIP checkpoint inside an Animate-14B folder."""
    path = Path(root) / CLIP_FILE
    if not path.is_file():
        raise CheckpointError(f"{root}: {CLIP_FILE} is missing; Animate-14B encodes the reference image with it")
    return path


def build_clip_vision(spec: ClipVisionSpec):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=spec.dim, intermediate_size=spec.dim * spec.mlp_ratio,
                              num_hidden_layers=spec.layers_used, num_attention_heads=spec.heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    return CLIPVisionModel(config).eval().requires_grad_(False)


_BLOCK = re.compile(r"^visual\.transformer\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def state_prefix(model) -> str:
    """What transformers puts before `embeddings.` in this version's CLIPVisionModel state dict."""
    key = next(k for k in model.state_dict() if k.endswith("embeddings.class_embedding"))
    return key.removesuffix("embeddings.class_embedding")


def clip_vision_tensors(official: dict[str, torch.Tensor], spec: ClipVisionSpec, dtype: torch.dtype,
                        prefix: str = "") -> dict[str, torch.Tensor]:
    """The official checkpoint's `visual.*` tensors under transformers' names (the fused q/k/v split, the class
    and position embeddings reshaped); the text tower, the last block and the projection head are skipped."""
    out = {}
    for key, t in official.items():
        t = t.to(dtype)
        if key == "visual.patch_embedding.weight":
            out[prefix + "embeddings.patch_embedding.weight"] = t
        elif key == "visual.cls_embedding":
            out[prefix + "embeddings.class_embedding"] = t.reshape(-1)
        elif key == "visual.pos_embedding":
            out[prefix + "embeddings.position_embedding.weight"] = t.reshape(-1, t.shape[-1])
        elif key.startswith(("visual.pre_norm.", "visual.post_norm.")):
            name = "pre_layrnorm" if "pre_norm" in key else "post_layernorm"
            out[prefix + name + "." + key.rsplit(".", 1)[1]] = t
        elif (m := _BLOCK.match(key)) and int(m[1]) < spec.layers_used:
            layer, rest = f"{prefix}encoder.layers.{m[1]}.", m[2]
            part, _, leaf = rest.rpartition(".")
            if part == "attn.to_qkv":
                for name, piece in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{leaf}"] = piece
            elif part in _BLOCK_PARTS:
                out[f"{layer}{_BLOCK_PARTS[part]}.{leaf}"] = t
    return out


def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> [B, tokens, dim] float32: resized (bicubic) to the tower's input, mapped
    to [0, 1] and normalised with CLIP's mean and std, as the reference's `CLIPModel.visual`."""
    config = model.config
    dtype = next(model.parameters()).dtype
    x = F.interpolate(images.float(), size=(config.image_size, config.image_size), mode="bicubic",
                      align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = ((x * 0.5 + 0.5) - mean) / std
    with torch.no_grad():
        return model(pixel_values=x.to(dtype)).last_hidden_state.float()
