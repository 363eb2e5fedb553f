"""Animate-14B: the character-animation parts of the one DiT (parity with the official classes:
bench/animate_parity.py, bench/results/animate_parity.json)."""
import pytest
import torch

from conftest import rel_err
from wanlite.archs import manifest
from wanlite.loading.keymaps import animate_key_from_official, animate_key_to_official
from wanlite.loading.models import dit_spec_from_shapes
from wanlite.models.animate import AnimateConditions, FaceAdapter, FaceTokens
from wanlite.models.dit import WanDiT, face_adapter_layers
from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS


def test_face_adapters_live_in_their_blocks_and_map_to_official_names():
    official = manifest("animate-14B")
    assert "face_adapter.fuser_blocks.7.linear1_kv.weight" in official
    assert animate_key_from_official("face_adapter.fuser_blocks.7.linear2.bias", 5) == "blocks.35.face_adapter.linear2.bias"
    for key in official:
        assert animate_key_to_official(animate_key_from_official(key, 5), 5) == key
    spec = DIT_SPECS["animate-14B"]
    assert face_adapter_layers(spec) == [0, 5, 10, 15, 20, 25, 30, 35]
    # the spec is read back from the official shapes
    assert dit_spec_from_shapes(official, {}, "animate") == spec


def _tiny(seed=0):
    torch.manual_seed(seed)
    spec = TINY_DIT_SPECS["animate-14B"]
    dit = WanDiT(spec).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if name.startswith("motion_encoder") else 0.05))
    return dit, spec


def _inputs(spec, frames=3, h=8, w=8, faces=5, size=32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, frames, h, w, generator=g)
    y = torch.randn(1, 20, frames, h, w, generator=g)
    cond = AnimateConditions(torch.randn(1, 257, spec.animate.clip_dim, generator=g),
                             torch.randn(1, 16, frames - 1, h, w, generator=g),
                             torch.rand(1, 3, faces, size, size, generator=g) * 2 - 1)
    return x, y, [torch.randn(6, spec.text_dim, generator=g)], cond


def test_chunked_blocks_equal_whole_blocks_with_image_context_and_face_adapters():
    dit, spec = _tiny()
    assert all(b.face_adapter is not None for b in dit.blocks)  # tiny: an adapter after every block
    x, y, ctx, cond = _inputs(spec)
    t = torch.tensor([640.0])
    with torch.no_grad():
        whole = dit(x, t, ctx, y=y, animate=cond)
        dit.chunk_tokens = 24  # frames of 16 tokens: chunks straddle them
        chunked = dit(x, t, ctx, y=y, animate=cond)
    assert rel_err(chunked, whole) < 1e-5


def test_faces_pose_and_reference_image_all_reach_the_output():
    dit, spec = _tiny()
    x, y, ctx, cond = _inputs(spec)
    t = torch.tensor([640.0])
    with torch.no_grad():
        base = dit(x, t, ctx, y=y, animate=cond)
        for field in ("clip_features", "pose_latents", "face_pixels"):
            changed = AnimateConditions(**{**cond.__dict__, field: getattr(cond, field).flip(-1)})
            assert rel_err(dit(x, t, ctx, y=y, animate=changed), base) > 1e-4, field


def test_face_adapter_attends_within_each_frame():
    torch.manual_seed(0)
    adapter = FaceAdapter(256, 2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3 * 10, 256)
    tokens = torch.randn(2, 3, 5, 256)
    with torch.no_grad():
        whole = adapter(x.clone(), FaceTokens(tokens))
        chunked = adapter(x.clone(), FaceTokens(tokens), frames_per_chunk=2)
        other = tokens.clone()
        other[:, 2] += 1  # only the last frame's face tokens change
        moved = adapter(x.clone(), FaceTokens(other))
    assert rel_err(chunked, whole) < 1e-6
    assert torch.equal(moved[:, :20], whole[:, :20]) and not torch.allclose(moved[:, 20:], whole[:, 20:])


def test_face_crops_must_cover_the_clip():
    dit, spec = _tiny()
    x, y, ctx, cond = _inputs(spec, faces=12)  # 12 crops -> 3 latent frames, the clip has 2 after the reference
    with pytest.raises(ValueError, match="face crops"), torch.no_grad():
        dit(x, torch.tensor([500.0]), ctx, y=y, animate=cond)


def _official_clip_tensors(model, spec):
    """transformers' CLIP vision state -> the official checkpoint's `visual.*` names (the inverse mapping)."""
    from wanlite.models.clip import state_prefix

    prefix = state_prefix(model)
    st = {k.removeprefix(prefix): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {"visual.patch_embedding.weight": st["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": st["embeddings.class_embedding"].view(1, 1, -1),
           "visual.pos_embedding": st["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": st["pre_layrnorm.weight"], "visual.pre_norm.bias": st["pre_layrnorm.bias"],
           "visual.post_norm.weight": st["post_layernorm.weight"], "visual.post_norm.bias": st["post_layernorm.bias"]}
    for i in range(spec.layers_used + 1):  # the checkpoint holds one block more than Animate uses
        src = f"encoder.layers.{min(i, spec.layers_used - 1)}."
        dst = f"visual.transformer.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{leaf}"] = torch.cat([st[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                                 ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
                out[dst + f"{theirs}.{leaf}"] = st[src + f"{ours}.{leaf}"]
    out["visual.head"] = torch.randn(spec.dim, 16)
    out["textual.token_embedding.weight"] = torch.randn(10, 8)
    out["log_scale"] = torch.tensor(4.6)
    return out


def test_clip_vision_tower_loads_from_the_official_pth(tmp_path):
    from wanlite.errors import CheckpointError
    from wanlite.models.clip import TINY_CLIP, build_clip_vision, encode_images, load_clip_vision

    torch.manual_seed(0)
    reference = build_clip_vision(TINY_CLIP)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    official = _official_clip_tensors(reference, TINY_CLIP)
    torch.save(official, tmp_path / "clip.pth")
    loaded = load_clip_vision(tmp_path / "clip.pth", TINY_CLIP, torch.float32)
    images = torch.rand(2, 3, 40, 30) * 2 - 1
    want = encode_images(reference, images)
    assert want.shape == (2, TINY_CLIP.tokens, TINY_CLIP.dim)
    assert torch.equal(encode_images(loaded, images), want)
    del official["visual.transformer.1.mlp.0.weight"]
    torch.save(official, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing .*mlp.fc1.weight"):
        load_clip_vision(tmp_path / "broken.pth", TINY_CLIP, torch.float32)
