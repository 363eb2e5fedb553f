"""Checkpoint key names -> wanlite (= official Wan) state-dict names, per source layout."""
from __future__ import annotations

import re


COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (official, diffusers `WanTransformer3DModel`) name pairs; `#` is a block index. An entry ending in "." is a
# prefix, any other a whole key. diffusers swapped the LayerNorm names: its affine `norm2` is the official
# cross-attention `norm3`.
_DIT_PAIRS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("blocks.#.modulation", "blocks.#.scale_shift_table"),
    ("blocks.#.norm3.", "blocks.#.norm2."),
    ("blocks.#.ffn.0.", "blocks.#.ffn.net.0.proj."),
    ("blocks.#.ffn.2.", "blocks.#.ffn.net.2."),
    *[(f"blocks.#.{ours}.{p}.", f"blocks.#.{theirs}.to_{p}.") for ours, theirs in
      (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qkv"],
    ("blocks.#.self_attn.o.", "blocks.#.attn1.to_out.0."),
    ("blocks.#.cross_attn.o.", "blocks.#.attn2.to_out.0."),
    *[(f"blocks.#.{ours}.norm_{p}.", f"blocks.#.{theirs}.norm_{p}.") for ours, theirs in
      (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qk"],
]


def _compile(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(source).replace("\\#", r"(\d+)") + ("" if source.endswith(".") else "$")
    return re.compile(pattern), target.replace("#", r"\1")


_FROM_DIFFUSERS = [_compile(theirs, ours) for ours, theirs in _DIT_PAIRS]
_TO_DIFFUSERS = [_compile(ours, theirs) for ours, theirs in _DIT_PAIRS]


def _apply(rules: list[tuple[re.Pattern, str]], key: str) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return key


def dit_key_from_diffusers(key: str) -> str:
    return _apply(_FROM_DIFFUSERS, key)


def dit_key_to_diffusers(key: str) -> str:
    """Official -> diffusers, for writing diffusers-layout files (fixtures, conversions)."""
    return _apply(_TO_DIFFUSERS, key)


def strip_comfy_prefix(key: str) -> str:
    for prefix in COMFY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# S2V: the official checkpoint keeps its audio injectors in one top-level list (`audio_injector.injector.K`,
# `audio_injector.injector_adain_layers.K.linear`); wanlite keeps injector K inside the block it follows
# (`blocks.L.audio_injector.attn` / `.adain`, L = inject_layers[K]) so it is loaded, offloaded and cached
# with that block.
_S2V_OFFICIAL = re.compile(r"^audio_injector\.(injector|injector_adain_layers)\.(\d+)\.(?:linear\.)?(.+)$")
_S2V_OURS = re.compile(r"^blocks\.(\d+)\.audio_injector\.(attn|adain)\.(.+)$")


def s2v_key_from_official(key: str, inject_layers: tuple[int, ...]) -> str:
    m = _S2V_OFFICIAL.match(key)
    if m is None or int(m[2]) >= len(inject_layers):
        return key
    part = "attn" if m[1] == "injector" else "adain"
    return f"blocks.{inject_layers[int(m[2])]}.audio_injector.{part}.{m[3]}"


def s2v_key_to_official(key: str, inject_layers: tuple[int, ...]) -> str:
    m = _S2V_OURS.match(key)
    if m is None:
        return key
    k = inject_layers.index(int(m[1]))
    return (f"audio_injector.injector.{k}.{m[3]}" if m[2] == "attn"
            else f"audio_injector.injector_adain_layers.{k}.linear.{m[3]}")


# Animate: the face adapters are one top-level list (`face_adapter.fuser_blocks.K`, after block every*K); wanlite
# keeps adapter K inside that block (`blocks.L.face_adapter`).
_ANIMATE_OFFICIAL = re.compile(r"^face_adapter\.fuser_blocks\.(\d+)\.(.+)$")
_ANIMATE_OURS = re.compile(r"^blocks\.(\d+)\.face_adapter\.(.+)$")


def animate_key_from_official(key: str, every: int) -> str:
    m = _ANIMATE_OFFICIAL.match(key)
    return key if m is None else f"blocks.{every * int(m[1])}.face_adapter.{m[2]}"


def animate_key_to_official(key: str, every: int) -> str:
    m = _ANIMATE_OURS.match(key)
    return key if m is None else f"face_adapter.fuser_blocks.{int(m[1]) // every}.{m[2]}"


def official_name(name: str, spec) -> str:
    """A wanlite parameter or module name as the official checkpoint (and LoRAs trained on it) spell it: S2V's
    audio injectors and Animate's face adapters sit in top-level lists there."""
    if spec is None or (spec.s2v is None and spec.animate is None):
        return name
    leaf = name + ".weight"  # module names have no leaf: borrow one for the patterns
    if spec.s2v is not None:
        leaf = s2v_key_to_official(leaf, spec.s2v.inject_layers)
    if spec.animate is not None:
        leaf = animate_key_to_official(leaf, spec.animate.face_every)
    return leaf.removesuffix(".weight")
