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


def test_clip_vision_tower_loads_from_the_official_pth(tmp_path):
    from wanlite.errors import CheckpointError
    from wanlite.loading.clip import load_clip_vision
    from wanlite.models.clip import TINY_CLIP, build_clip_vision, encode_images

    from wanlite.testing.fixtures import write_tiny_clip

    write_tiny_clip(tmp_path / "clip.pth", seed=3)
    torch.manual_seed(3)
    reference = build_clip_vision(TINY_CLIP)  # the model the fixture writer saved, rebuilt from the same seed
    loaded = load_clip_vision(tmp_path / "clip.pth", TINY_CLIP, torch.float32)
    images = torch.rand(2, 3, 40, 30) * 2 - 1
    want = encode_images(reference, images)
    assert want.shape == (2, TINY_CLIP.tokens, TINY_CLIP.dim)
    assert torch.equal(encode_images(loaded, images), want)
    official = torch.load(tmp_path / "clip.pth", weights_only=True)
    del official["visual.transformer.1.mlp.0.weight"]
    torch.save(official, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing .*mlp.fc1.weight"):
        load_clip_vision(tmp_path / "broken.pth", TINY_CLIP, torch.float32)



# diffusers (`WanAnimateTransformer3DModel`) -> official names, for the parity test only (wanlite does not read
# diffusers-layout Animate checkpoints yet)
_DIFFUSERS_ANIMATE = [
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^motion_encoder\.motion_synthesis_weight$", "motion_encoder.dec.direction.weight"),
    (r"^motion_encoder\.conv_in\.weight$", "motion_encoder.enc.net_app.convs.0.0.weight"),
    (r"^motion_encoder\.conv_in\.act_fn\.bias$", "motion_encoder.enc.net_app.convs.0.1.bias"),
    (r"^motion_encoder\.res_blocks\.(\d+)\.conv1\.weight$", r"res\1.conv1.0.weight"),
    (r"^motion_encoder\.res_blocks\.(\d+)\.conv1\.act_fn\.bias$", r"res\1.conv1.1.bias"),
    (r"^motion_encoder\.res_blocks\.(\d+)\.conv2\.weight$", r"res\1.conv2.1.weight"),
    (r"^motion_encoder\.res_blocks\.(\d+)\.conv2\.act_fn\.bias$", r"res\1.conv2.2.bias"),
    (r"^motion_encoder\.res_blocks\.(\d+)\.conv_skip\.weight$", r"res\1.skip.1.weight"),
    (r"^motion_encoder\.motion_network\.", "motion_encoder.enc.fc."),
    (r"^face_encoder\.(conv1_local|conv2|conv3)\.", r"face_encoder.\1.conv."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    (r"^face_adapter\.(\d+)\.to_q\.", r"face_adapter.fuser_blocks.\1.linear1_q."),
    (r"^face_adapter\.(\d+)\.to_out\.", r"face_adapter.fuser_blocks.\1.linear2."),
    (r"^face_adapter\.(\d+)\.norm_q\.", r"face_adapter.fuser_blocks.\1.q_norm."),
    (r"^face_adapter\.(\d+)\.norm_k\.", r"face_adapter.fuser_blocks.\1.k_norm."),
]


def _official_from_diffusers(sd: dict) -> dict:
    import re

    from wanlite.loading.keymaps import dit_key_from_diffusers

    res_blocks = sum(1 for k in sd if re.match(r"^motion_encoder\.res_blocks\.\d+\.conv1\.weight$", k))
    out = {}
    for key, t in sd.items():
        if re.match(r"^face_adapter\.\d+\.to_[kv]\.", key):  # fused below: k rows first, then v
            continue
        if key == "motion_encoder.conv_out.weight":
            out[f"motion_encoder.enc.net_app.convs.{res_blocks + 1}.weight"] = t
            continue
        for pattern, repl in _DIFFUSERS_ANIMATE:
            name, n = re.subn(pattern, repl, key)
            if n:
                if name.startswith("res"):  # resblock K is the network's conv K + 1
                    i, rest = name[3:].split(".", 1)
                    name = f"motion_encoder.enc.net_app.convs.{int(i) + 1}.{rest}"
                break
        else:
            name = dit_key_from_diffusers(key)
        out[name] = t.view(1, -1, 1, 1) if key.endswith("act_fn.bias") else t
    for k in {key.split(".")[1] for key in sd if key.startswith("face_adapter.")}:
        for leaf in ("weight", "bias"):
            out[f"face_adapter.fuser_blocks.{k}.linear1_kv.{leaf}"] = torch.cat(
                [sd[f"face_adapter.{k}.to_k.{leaf}"], sd[f"face_adapter.{k}.to_v.{leaf}"]])
    return out


def test_forward_matches_diffusers_wan_animate_transformer():
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "WanAnimateTransformer3DModel"):
        pytest.skip("this diffusers has no WanAnimateTransformer3DModel")
    spec = TINY_DIT_SPECS["animate-14B"]
    a = spec.animate
    torch.manual_seed(0)
    widths = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32}
    ref = diffusers.WanAnimateTransformer3DModel(
        num_attention_heads=spec.num_heads, attention_head_dim=spec.head_dim, text_dim=spec.text_dim,
        ffn_dim=spec.ffn_dim, num_layers=spec.num_layers, inject_face_latents_blocks=a.face_every,
        motion_encoder_size=a.face_size, motion_encoder_channel_sizes={str(k): min(v, a.face_width)
                                                                       for k, v in widths.items()},
        motion_style_dim=a.motion_dim, motion_dim=a.motion_codes, motion_encoder_dim=a.motion_dim,
        face_encoder_hidden_dim=a.face_hidden, image_dim=a.clip_dim, added_kv_proj_dim=spec.dim).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if name.startswith("motion_encoder") else 0.05))
    ours = WanDiT(spec).eval()
    state = {animate_key_from_official(k, a.face_every): v for k, v in _official_from_diffusers(ref.state_dict()).items()}
    blur = {k: v for k, v in ours.state_dict().items() if k.endswith(".kernel")}  # constants, not in diffusers' dict
    ours.load_state_dict({**blur, **state}, strict=True)
    x, y, ctx, cond = _inputs(spec)
    t = torch.tensor([700.0])
    text = torch.cat([ctx[0], ctx[0].new_zeros(spec.text_len - len(ctx[0]), spec.text_dim)])[None]
    with torch.no_grad():
        want = ref(torch.cat([x, y], 1), t, text, cond.clip_features, cond.pose_latents, cond.face_pixels,
                   return_dict=False)[0]
        got = ours(x, t, ctx, y=y, animate=cond)
    assert rel_err(got, want) <= 1e-4


# ---------------------------------------------------------------- generation (tiny Animate, official layout)

import numpy as np  # noqa: E402

from wanlite import generate  # noqa: E402
from wanlite.pipelines.video_io import read_mp4, read_mp4_metadata, write_mp4  # noqa: E402
from wanlite.testing.fixtures import write_fixture  # noqa: E402
from wanlite.testing.inputs import write_sources  # noqa: E402



@pytest.fixture(scope="module")
def animate_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("animate")
    return {"ckpt": write_fixture("animate-14B", "official", root / "ckpt"),
            "anim": write_sources(root / "anim"), "repl": write_sources(root / "repl", replace=True)}


@pytest.mark.parametrize("mode", ["animation", "replacement"])
def test_two_segment_generation_in_both_modes(animate_inputs, tmp_path, mode):
    replace = mode == "replacement"
    result = generate(task="animate-14B", prompt="a person dancing", ckpt_dir=animate_inputs["ckpt"],
                      src_root_path=animate_inputs["repl" if replace else "anim"], replace=replace, frames=9,
                      steps=2, seed=3, dtype="fp32", save_file=tmp_path / "out.mp4")
    frames, info = read_mp4(result.path)
    # 12 source frames in segments of 9 overlapping by 1: padded to 17 (0..8, 8..16), trimmed back to 12
    assert frames.shape == (12, 64, 64, 3) and info["fps"] == 30
    meta = read_mp4_metadata(result.path)["job"]["settings"]
    assert meta["task"] == "animate-14B" and meta["replace"] is replace and meta["refert_num"] == 1
    assert result.frames.std() > 1


def test_segment_plan_pads_by_ping_pong_and_overlaps():
    from wanlite.pipelines.animate import padded_length, ping_pong

    assert padded_length(12, 9, 1) == 17 and padded_length(77, 77, 1) == 77 and padded_length(100, 77, 5) == 149
    assert ping_pong(np.arange(4), 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]


def _black(frames, side, name):
    return lambda folder: write_mp4(np.zeros((frames, side, side, 3), np.uint8), folder / name, fps=30)


@pytest.mark.parametrize("damage,flags,message", [
    (lambda d: (d / "src_face.mp4").unlink(), [], "src_face.mp4 missing"),
    (_black(7, 32, "src_face.mp4"), [], "src_face.mp4 has 7 frames but src_pose.mp4 has 12"),
    (lambda d: None, ["--refert_num", "3"], "--refert_num 3 must be 1 or 5"),
    (_black(12, 32, "src_mask.mp4"), ["--replace"], "src_mask.mp4 is 32x32"),
])
def test_bad_animate_input_is_one_line_exit_2(animate_inputs, tmp_path, capsys, damage, flags, message):
    import shutil

    from wanlite.cli import main

    src = shutil.copytree(animate_inputs["repl"], tmp_path / "src")
    damage(src)
    out = tmp_path / "bad.mp4"
    code = main(["generate", "--task", "animate-14B", "--prompt", "x", "--ckpt_dir", str(animate_inputs["ckpt"]),
                 "--src_root_path", str(src), "--frame_num", "9", "--sample_steps", "1", "--save_file", str(out),
                 *flags])
    line = capsys.readouterr().err.strip()
    assert code == 2, line
    assert "\n" not in line and message in line, line
    assert not out.exists()


def test_plan_fits_12gb_with_32gb_ram_at_720p():
    from wanlite.planner.estimate import Workload
    from wanlite.planner.plan import make_plan
    from wanlite.planner.probe import hypothetical

    work = Workload("animate-14B", 1280, 720, 77, 20, passes=1)  # guide 1: no unconditional pass
    assert work.tokens == 21 * 3600  # the reference latent frame + 20 of the segment
    plan = make_plan(work, hypothetical(12, 32))
    assert plan.predicted.peak_vram_gb <= 12 and plan.predicted.peak_ram_gb <= 32 and plan.vae_tile


def test_relighting_lora_applies_to_every_block_linear(animate_inputs, tmp_path):
    kw = dict(task="animate-14B", prompt="a person dancing", ckpt_dir=animate_inputs["ckpt"], replace=True,
              src_root_path=animate_inputs["repl"], frames=9, steps=2, seed=3, dtype="fp32")
    plain = generate(save_file=tmp_path / "a.mp4", **kw)
    lit = generate(save_file=tmp_path / "b.mp4", relighting_lora=True, **kw)
    applied = read_mp4_metadata(lit.path)["lora_applied"]["main"]
    # 2 blocks x (self q k v o, cross q k v o k_img v_img, ffn 0 2) = 24 linears
    assert applied["merged"] + applied["runtime"] == 24
    assert np.abs(plain.frames.astype(int) - lit.frames.astype(int)).mean() > 0.5


def test_check_lists_the_clip_encoder(animate_inputs, capsys):
    from wanlite.cli import main

    assert main(["check", "--task", "animate-14B", "--ckpt_dir", str(animate_inputs["ckpt"])]) == 0
    printed = capsys.readouterr().out
    assert "CLIP" in printed and "transformer" in printed
    assert printed.count("missing") == 3  # the fixture has no preprocessing models: listed, not required


def test_check_lists_the_preprocessing_models(animate_inputs, tmp_path, capsys):
    import shutil

    from wanlite.cli import main
    from wanlite.testing.prep_models import write_prep_models

    ckpt = write_prep_models(shutil.copytree(animate_inputs["ckpt"], tmp_path / "ckpt"))
    assert main(["check", "--task", "animate-14B", "--ckpt_dir", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "yolov10m.onnx" in printed and "vitpose_h" in printed and printed.count("missing") == 1  # sam2
