"""S2V-14B: the speech-to-video parts of the one DiT, audio features, key names (parity with the official code:
bench/s2v_parity.py, bench/results/s2v_parity.json)."""
import numpy as np
import pytest
import torch

from conftest import rel_err
from wanlite.archs import manifest
from wanlite.loading.keymaps import s2v_key_from_official, s2v_key_to_official
from wanlite.models.dit import WanDiT
from wanlite.models.s2v import AudioInjector, AudioTokens, FramePacker, S2VConditions
from wanlite.pipelines.audio import frame_features, resample_features
from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS


def test_injectors_live_in_their_blocks_and_map_to_official_names():
    layers = DIT_SPECS["s2v-14B"].s2v.inject_layers
    official = manifest("s2v-14B")
    assert "audio_injector.injector.11.q.weight" in official
    assert s2v_key_from_official("audio_injector.injector.11.q.weight", layers) == \
        "blocks.39.audio_injector.attn.q.weight"
    assert s2v_key_from_official("audio_injector.injector_adain_layers.6.linear.bias", layers) == \
        "blocks.24.audio_injector.adain.bias"
    for key in official:
        assert s2v_key_to_official(s2v_key_from_official(key, layers), layers) == key
    with torch.device("meta"):
        dit = WanDiT(DIT_SPECS["s2v-14B"])
    assert [i for i, b in enumerate(dit.blocks) if b.audio_injector is not None] == list(layers)
    per_block = sum(p.numel() for p in dit.blocks[1].parameters())
    injector = sum(p.numel() for p in dit.blocks[0].audio_injector.parameters())
    assert sum(p.numel() for p in dit.blocks.parameters()) == 40 * per_block + 12 * injector


def test_framepack_positions_match_the_reference_layout():
    # newest latent at t=-1 on the full token grid, 2 latents at t=-3 and 16 at t=-19,-14,-9,-4 on coarser
    # grids spread over the full one (spec §9.4)
    spec = TINY_DIT_SPECS["s2v-14B"].s2v
    packer = FramePacker(spec, 256)
    h, w = 16, 24
    tokens, pos = packer(torch.randn(1, 16, 19, h, w))
    n1, n2, n4 = (h // 2) * (w // 2), (h // 4) * (w // 4), 4 * (h // 8) * (w // 8)
    assert tokens.shape == (1, n1 + n2 + n4, 256) and pos.shape == (n1 + n2 + n4, 3)
    assert set(pos[:n1, 0].tolist()) == {-1} and set(pos[n1:n1 + n2, 0].tolist()) == {-3}
    assert sorted(set(pos[n1 + n2:, 0].tolist())) == [-19, -14, -9, -4]
    assert sorted(set(pos[n1:n1 + n2, 1].tolist())) == [0, 2, 4, 7]  # np.linspace(0, 7, 4) truncated
    assert pos[n1 + n2:, 2].max() == w // 2 - 1
    # shorter history: zero latents fill the oldest slots
    few, _ = packer(torch.randn(1, 16, 1, h, w))
    empty, _ = packer(torch.zeros(1, 16, 1, h, w))
    assert torch.equal(few[:, n1:], empty[:, n1:])


def _tiny_s2v(seed=0):
    torch.manual_seed(seed)
    spec = TINY_DIT_SPECS["s2v-14B"]
    dit = WanDiT(spec).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return dit, spec


def _s2v_inputs(spec, frames=3, h=16, w=16, motion=True, pose=True, batch=1):
    s2v = spec.s2v
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    cond = S2VConditions(torch.randn(batch, 16, 1, h, w, generator=g),
                         torch.randn(batch, s2v.audio_layers, s2v.audio_dim, 4 * frames, generator=g),
                         torch.randn(batch, 16, s2v.motion_latents, h, w, generator=g) if motion else None,
                         torch.randn(batch, 16, frames, h, w, generator=g) if pose else None)
    return x, [torch.randn(5, spec.text_dim, generator=g)] * batch, cond


def test_chunked_blocks_equal_whole_blocks_with_segment_modulation():
    dit, spec = _tiny_s2v()
    x, ctx, cond = _s2v_inputs(spec)
    t = torch.tensor([700.0])
    with torch.no_grad():
        whole = dit(x, t, ctx, s2v=cond)
        dit.chunk_tokens = 40  # straddles frames, the noisy/reference boundary and the motion tokens
        chunked = dit(x, t, ctx, s2v=cond)
    assert rel_err(chunked, whole) < 1e-5


def test_reference_and_motion_tokens_see_timestep_zero():
    # the zero-timestep row: with every block's modulation of the clean tokens pinned to t=0, a forward at t
    # equals one where those tokens' row was computed at t (checked by swapping the rows' source)
    dit, spec = _tiny_s2v()
    x, ctx, cond = _s2v_inputs(spec)
    seen = []
    for block in dit.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        dit(x, torch.tensor([500.0]), ctx, s2v=cond)
    inputs = seen[0]
    _, e0_zero = dit.embed_time(torch.zeros(1, 1))
    _, e0_t = dit.embed_time(torch.full((1, 1), 500.0))
    assert torch.equal(inputs.e0[:, 1:], e0_zero) and torch.equal(inputs.e0[:, :1], e0_t)
    hw = 8 * 8
    assert inputs.split[0] == 3 * hw and inputs.split[1] == hw + (hw + hw // 4 + 4 * hw // 16)


def test_audio_injector_touches_only_noisy_tokens_and_chunks_by_frame():
    torch.manual_seed(0)
    injector = AudioInjector(256, 2, 1e-6)
    with torch.no_grad():
        for p in injector.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    frames, per_frame, extra = 4, 6, 5
    x = torch.randn(2, frames * per_frame + extra, 256)
    audio = AudioTokens(torch.randn(2, frames, 5, 256), torch.randn(2, frames, 256), frames * per_frame)
    with torch.no_grad():
        whole = injector(x.clone(), audio)
        chunked = injector(x.clone(), audio, frames_per_chunk=3)
    assert torch.equal(whole[:, -extra:], x[:, -extra:])
    assert not torch.allclose(whole[:, :-extra], x[:, :-extra])
    assert rel_err(chunked, whole) < 1e-6


def test_silent_uncond_row_and_no_pose_differ_from_conditioned():
    dit, spec = _tiny_s2v()
    x, ctx, cond = _s2v_inputs(spec, pose=False)
    t = torch.tensor([400.0])
    with torch.no_grad():
        speaking = dit(x, t, ctx, s2v=cond)
        cond.audio = torch.zeros_like(cond.audio)
        silent = dit(x, t, ctx, s2v=cond)
    assert rel_err(silent, speaking) > 1e-3


def test_audio_frames_must_match_the_clip():
    dit, spec = _tiny_s2v()
    x, ctx, cond = _s2v_inputs(spec)
    cond.audio = cond.audio[..., :-4]
    with pytest.raises(ValueError, match="audio frames"), torch.no_grad():
        dit(x, torch.tensor([400.0]), ctx, s2v=cond)


def test_frame_features_pick_the_nearest_30fps_column_half_to_even():
    layers, length, channels = 2, 45, 3  # 1.5 s at 30 fps
    states = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(layers, length, channels)
    out, clips = frame_features(states, fps=16, clip_frames=8)
    assert clips == 4 and out.shape == (layers, channels, 32)  # 45 / 15 columns per clip -> 3 + 1
    picked = out[0, 0].tolist()
    assert picked[4] == 8.0  # 4/16 s = 7.5 columns: rounds half to even
    assert picked[12] == 22.0  # 22.5 -> 22
    assert picked[23] == 43.0 and picked[24] == 0.0  # 45 columns end at frame 24 (round(24*1.875) = 45)
    assert np.allclose(out[1].numpy(), out[0].numpy())


def test_features_resampled_to_30fps_with_aligned_corners():
    states = torch.linspace(0, 1, 100).view(1, 100, 1)  # 2 s at 50 Hz
    out = resample_features(states)
    assert out.shape == (1, 60, 1)
    assert out[0, 0, 0] == 0 and abs(float(out[0, -1, 0]) - 1) < 1e-6


# ---------------------------------------------------------------- generation (tiny S2V, official layout)
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from wanlite import generate  # noqa: E402
from wanlite.pipelines.audio import read_audio  # noqa: E402
from wanlite.pipelines.video_io import read_mp4, read_mp4_metadata  # noqa: E402
from wanlite.testing.fixtures import write_fixture  # noqa: E402
from wanlite.testing.inputs import write_wav  # noqa: E402



@pytest.fixture(scope="module")
def s2v_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v")
    ckpt = write_fixture("s2v-14B", "official", root / "ckpt")
    rgb = np.zeros((80, 64, 3), np.uint8)
    rgb[20:50, 16:48] = (230, 180, 150)
    Image.fromarray(rgb).save(root / "face.png")
    return {"ckpt": ckpt, "image": root / "face.png", "audio": write_wav(root / "speech.wav", 0.8), "root": root}


def _s2v(inputs, out, **kw):
    args = dict(task="s2v-14B", prompt="a person talking", ckpt_dir=inputs["ckpt"], image=inputs["image"],
                audio=inputs["audio"], size=(64, 64), frames=8, steps=2, seed=5, dtype="fp32", save_file=out)
    args.update(kw)
    return generate(**args)


def test_two_clip_generation_muxes_the_audio_to_the_video_length(s2v_inputs, tmp_path):
    result = _s2v(s2v_inputs, tmp_path / "talk.mp4")
    frames, info = read_mp4(result.path)
    # 0.8 s of audio covers 2 clips of 8 frames: 5 (the first drops 3) + 8, capped at ceil(0.8 * 16) = 13
    assert frames.shape[0] == 13 and result.settings.num_clip == 2
    assert result.settings.size == (64, 64) and info["fps"] == 16
    audio_seconds = read_audio(result.path).size / 16000
    assert abs(audio_seconds - frames.shape[0] / 16) <= 1 / 16
    meta = read_mp4_metadata(result.path)["job"]["settings"]
    assert meta["task"] == "s2v-14B" and meta["audio"].endswith("speech.wav") and meta["frames"] == 8
    assert result.frames.std() > 1


def test_num_clip_limits_and_trims_the_audio(s2v_inputs, tmp_path):
    result = _s2v(s2v_inputs, tmp_path / "one.mp4", num_clip=1)
    frames, _ = read_mp4(result.path)
    assert frames.shape[0] == 5
    assert abs(read_audio(result.path).size / 16000 - 5 / 16) <= 1 / 16


def test_pose_video_and_start_from_ref_run(s2v_inputs, tmp_path):
    from wanlite.pipelines.video_io import write_mp4

    pose = np.zeros((20, 48, 48, 3), np.uint8)
    for i in range(20):
        pose[i, 10:30, 5 + i:15 + i] = 255
    pose_path = write_mp4(pose, tmp_path / "pose.mp4", fps=16)
    plain = _s2v(s2v_inputs, tmp_path / "a.mp4", num_clip=1, start_from_ref=True)
    posed = _s2v(s2v_inputs, tmp_path / "b.mp4", num_clip=1, start_from_ref=True, pose_video=pose_path)
    # no frames dropped when the history starts from the reference: the first clip keeps all 8
    assert plain.frames.shape[0] == 8 and posed.frames.shape[0] == 8
    assert np.abs(plain.frames.astype(int) - posed.frames.astype(int)).mean() > 0.05  # pose latents reach the DiT


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cli(inputs, tmp_path, capsys, *extra):
    """`wanlite generate` in-process: (exit code, stderr, the --save_file path)."""
    from wanlite.cli import main

    out = tmp_path / "bad.mp4"
    code = main(["generate", "--task", "s2v-14B", "--prompt", "hi", "--ckpt_dir", str(inputs["ckpt"]), "--image",
                 str(inputs["image"]), "--size", "64*64", "--sample_steps", "1", "--save_file", str(out), *extra])
    return code, capsys.readouterr().err.strip(), out


@pytest.mark.parametrize("make,flags,message", [
    (lambda d, i: i["image"], ["--audio"], "has no audio stream"),
    (lambda d, i: _written(d / "noise.mp3", b"\x00garbage" * 50), ["--audio"], "ffmpeg cannot read it"),
    (lambda d, i: write_wav(d / "blip.wav", 0.03), ["--audio"], "shorter than one video frame"),
    (lambda d, i: i["audio"], ["--infer_frames", "10", "--audio"], "must be a multiple of 4"),
    (lambda d, i: i["audio"], ["--pose_video", "{bad}", "--audio"], "--pose_video"),
])
def test_bad_speech_input_is_one_line_exit_2(s2v_inputs, tmp_path, capsys, make, flags, message):
    bad = tmp_path / "pose.mp4"
    bad.write_bytes(b"not a video at all")
    path = make(tmp_path, s2v_inputs)
    code, line, out = _cli(s2v_inputs, tmp_path, capsys, *[f.replace("{bad}", str(bad)) for f in flags], str(path))
    assert code == 2, line
    assert "\n" not in line and message in line, line
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_block_offload_and_step_cache_carry_the_injectors(s2v_inputs, tmp_path):
    # blocks with and without an audio injector stream through the same buffers (disk cache included); a step
    # cache skipping middle blocks for one CFG branch slices the audio tokens with the rows
    plain = _s2v(s2v_inputs, tmp_path / "plain.mp4", num_clip=1)
    streamed = _s2v(s2v_inputs, tmp_path / "disk.mp4", num_clip=1, offload="block", ram_mode="disk",
                    resident_blocks=0, prefetch=1, offload_cache=tmp_path / "cache")
    assert np.array_equal(plain.frames, streamed.frames)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("block_*.bin")) == ["block_000.bin", "block_001.bin"]
    cached = _s2v(s2v_inputs, tmp_path / "cached.mp4", num_clip=1, steps=10, cache="safe")
    assert cached.cache["skipped_fraction"] > 0 and cached.frames.shape == plain.frames.shape


def test_check_lists_the_wav2vec_folder_and_a_missing_one_is_one_line(s2v_inputs, tmp_path, capsys):
    import shutil

    from wanlite.cli import main

    assert main(["check", "--task", "s2v-14B", "--ckpt_dir", str(s2v_inputs["ckpt"])]) == 0
    printed = capsys.readouterr().out
    assert "wav2vec2" in printed and "transformer" in printed
    broken = shutil.copytree(s2v_inputs["ckpt"], tmp_path / "ckpt")
    shutil.rmtree(broken / "wav2vec2-large-xlsr-53-english")
    code, line, out = _cli({**s2v_inputs, "ckpt": broken}, tmp_path, capsys, "--audio", str(s2v_inputs["audio"]))
    assert code == 2 and "no wav2vec2 folder found" in line and not out.exists()


def test_plan_counts_the_injectors_and_fits_12gb_with_32gb_ram_at_480p():
    import math

    from wanlite.planner.estimate import Workload, dit_bytes
    from wanlite.planner.plan import make_plan
    from wanlite.planner.probe import hypothetical

    spec = DIT_SPECS["s2v-14B"]
    nonblock, block = dit_bytes(spec, "bf16")
    total = 2 * sum(math.prod(s) for s in manifest("s2v-14B").values())
    assert abs(nonblock + spec.num_layers * block - total) <= 2 * spec.num_layers  # the mean block, to the byte
    work = Workload("s2v-14B", 832, 480, 80, 40)
    assert work.tokens == 20 * 1560 + 2 * 1560 + 15 * 26 + 4 * 7 * 13  # clip + reference + FramePack history
    plan = make_plan(work, hypothetical(12, 32))
    assert plan.predicted.peak_vram_gb <= 12 and plan.predicted.peak_ram_gb <= 32
    assert plan.vae_tile  # the VAE shares the card with the transformer between clips


def test_loras_naming_injectors_the_official_way_reach_them():
    from wanlite.lora.keys import map_lora

    with torch.device("meta"):
        dit = WanDiT(TINY_DIT_SPECS["s2v-14B"])
    d = dit.spec.dim
    tensors = {"diffusion_model.audio_injector.injector.1.q.lora_down.weight": torch.randn(4, d),
               "diffusion_model.audio_injector.injector.1.q.lora_up.weight": torch.randn(d, 4),
               "lora_unet_audio_injector_injector_adain_layers_0_linear.lora_down.weight": torch.randn(4, d),
               "lora_unet_audio_injector_injector_adain_layers_0_linear.lora_up.weight": torch.randn(2 * d, 4)}
    native = map_lora(Path("a.safetensors"), dict(list(tensors.items())[:2]), dit)
    kohya = map_lora(Path("b.safetensors"), dict(list(tensors.items())[2:]), dit)
    assert set(native.low_rank) == {"blocks.1.audio_injector.attn.q"} and not native.unmatched
    assert set(kohya.low_rank) == {"blocks.0.audio_injector.adain"} and not kohya.unmatched
