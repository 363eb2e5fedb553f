"""Checkpoint key names -> wanlite (= official Wan) state-dict names, per source layout."""
from __future__ import annotations

import re

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# diffusers `WanTransformer3DModel` -> official, applied in order (inverse of diffusers'
# TRANSFORMER_KEYS_RENAME_DICT). diffusers swapped the names of the two LayerNorms: its affine `norm2` is the
# official cross-attention `norm3`.
_DIT_FROM_DIFFUSERS = [
    (re.compile(r"^condition_embedder\.time_embedder\.linear_1\."), "time_embedding.0."),
    (re.compile(r"^condition_embedder\.time_embedder\.linear_2\."), "time_embedding.2."),
    (re.compile(r"^condition_embedder\.text_embedder\.linear_1\."), "text_embedding.0."),
    (re.compile(r"^condition_embedder\.text_embedder\.linear_2\."), "text_embedding.2."),
    (re.compile(r"^condition_embedder\.time_proj\."), "time_projection.1."),
    (re.compile(r"^scale_shift_table$"), "head.modulation"),
    (re.compile(r"^proj_out\."), "head.head."),
    (re.compile(r"^(blocks\.\d+)\.scale_shift_table$"), r"\1.modulation"),
    (re.compile(r"^(blocks\.\d+)\.norm2\."), r"\1.norm3."),
    (re.compile(r"^(blocks\.\d+)\.ffn\.net\.0\.proj\."), r"\1.ffn.0."),
    (re.compile(r"^(blocks\.\d+)\.ffn\.net\.2\."), r"\1.ffn.2."),
    (re.compile(r"^(blocks\.\d+)\.attn1\.to_out\.0\."), r"\1.self_attn.o."),
    (re.compile(r"^(blocks\.\d+)\.attn2\.to_out\.0\."), r"\1.cross_attn.o."),
    (re.compile(r"^(blocks\.\d+)\.attn1\.to_([qkv])\."), r"\1.self_attn.\2."),
    (re.compile(r"^(blocks\.\d+)\.attn2\.to_([qkv])\."), r"\1.cross_attn.\2."),
    (re.compile(r"^(blocks\.\d+)\.attn1\.norm_([qk])\."), r"\1.self_attn.norm_\2."),
    (re.compile(r"^(blocks\.\d+)\.attn2\.norm_([qk])\."), r"\1.cross_attn.norm_\2."),
]


def dit_key_from_diffusers(key: str) -> str:
    for pattern, repl in _DIT_FROM_DIFFUSERS:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def strip_comfy_prefix(key: str) -> str:
    for prefix in COMFY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# official -> diffusers, for writing diffusers-layout files (fixtures, conversions); inverse of the table above.
_DIT_TO_DIFFUSERS = [
    (re.compile(r"^time_embedding\.([02])\."), lambda m: f"condition_embedder.time_embedder.linear_{int(m[1]) // 2 + 1}."),
    (re.compile(r"^text_embedding\.([02])\."), lambda m: f"condition_embedder.text_embedder.linear_{int(m[1]) // 2 + 1}."),
    (re.compile(r"^time_projection\.1\."), "condition_embedder.time_proj."),
    (re.compile(r"^head\.modulation$"), "scale_shift_table"),
    (re.compile(r"^head\.head\."), "proj_out."),
    (re.compile(r"^(blocks\.\d+)\.modulation$"), r"\1.scale_shift_table"),
    (re.compile(r"^(blocks\.\d+)\.norm3\."), r"\1.norm2."),
    (re.compile(r"^(blocks\.\d+)\.ffn\.0\."), r"\1.ffn.net.0.proj."),
    (re.compile(r"^(blocks\.\d+)\.ffn\.2\."), r"\1.ffn.net.2."),
    (re.compile(r"^(blocks\.\d+)\.self_attn\.o\."), r"\1.attn1.to_out.0."),
    (re.compile(r"^(blocks\.\d+)\.cross_attn\.o\."), r"\1.attn2.to_out.0."),
    (re.compile(r"^(blocks\.\d+)\.self_attn\.([qkv])\."), r"\1.attn1.to_\2."),
    (re.compile(r"^(blocks\.\d+)\.cross_attn\.([qkv])\."), r"\1.attn2.to_\2."),
    (re.compile(r"^(blocks\.\d+)\.self_attn\.norm_([qk])\."), r"\1.attn1.norm_\2."),
    (re.compile(r"^(blocks\.\d+)\.cross_attn\.norm_([qk])\."), r"\1.attn2.norm_\2."),
]


def dit_key_to_diffusers(key: str) -> str:
    for pattern, repl in _DIT_TO_DIFFUSERS:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key
