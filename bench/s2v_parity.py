"""One-off numerical parity of wanlite's S2V against the official implementation, on CPU in fp32.

Usage: python bench/s2v_parity.py --official PATH
PATH is a checkout of https://github.com/Wan-Video/Wan2.2 (only its `wan/` folder is read; its package
__init__ files are not run, and its CUDA-only flash_attention is replaced by a plain softmax attention that
refuses any key-length masking, which these inputs never need). Both sides get the same random weights
(tiny config: dim 256, 2 heads, 2 blocks, audio injected after both, every parameter randomised, zero-inits
included) and the same inputs; the official `AudioEncoder` runs on a tiny random wav2vec2 that transformers
writes to a temporary folder. Writes bench/results/s2v_parity.json (max relative error; target <= 1e-4).
"""
from __future__ import annotations

import sys
import tempfile
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import load_official, official_checkout, provenance, rel  # noqa: E402
from harness import write_json  # noqa: E402


def load(root: Path):
    model_s2v, = load_official(root, "wan.modules.s2v.model_s2v")
    # librosa is not installed here: only its load() is used, replaced in audio_parity (after diffusers'
    # import-time package probing, which a bare module would upset)
    sys.modules.setdefault("librosa", types.ModuleType("librosa"))
    audio_encoder, = load_official(root, "wan.modules.s2v.audio_encoder")
    return model_s2v, audio_encoder


def dit_parity(model_s2v) -> dict:
    from wanlite.loading.keymaps import s2v_key_from_official
    from wanlite.models.dit import WanDiT
    from wanlite.models.s2v import S2VConditions
    from wanlite.specs import TINY_DIT_SPECS

    spec = TINY_DIT_SPECS["s2v-14B"]
    s2v = replace(spec.s2v, audio_layers=25)  # the official CausalAudioEncoder always mixes 25 layers
    spec = replace(spec, s2v=s2v)
    torch.manual_seed(0)
    official = model_s2v.WanModel_S2V(
        cond_dim=s2v.cond_dim, audio_dim=s2v.audio_dim, num_audio_token=s2v.audio_tokens, enable_adain=True,
        adain_mode="attn_norm", audio_inject_layers=list(s2v.inject_layers), zero_init=True, zero_timestep=True,
        enable_motioner=False, add_last_motion=True, enable_framepack=True, framepack_drop_mode="padd",
        dim=spec.dim, ffn_dim=spec.ffn_dim, num_heads=spec.num_heads, num_layers=spec.num_layers,
        text_dim=spec.text_dim, in_dim=spec.in_dim, out_dim=spec.out_dim).eval()
    with torch.no_grad():
        for p in official.parameters():  # zero-initialised parts must be exercised too
            p.copy_(torch.randn_like(p) * 0.05)
    ours = WanDiT(spec).eval()
    layers = s2v.inject_layers
    state = {s2v_key_from_official(k, layers): v for k, v in official.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=True), None
    del missing, unexpected

    frames, h, w, clip_frames = 3, 16, 24, 12  # 3 latent frames = 12 video frames of audio
    x = torch.randn(1, 16, frames, h, w)
    ref = torch.randn(1, 16, 1, h, w)
    motion = torch.randn(1, 16, s2v.motion_latents, h, w)
    pose = torch.randn(1, 16, frames, h, w)
    audio = torch.randn(1, s2v.audio_layers, s2v.audio_dim, clip_frames)
    context = torch.randn(7, spec.text_dim)
    t = torch.tensor([623.0])
    results = {}
    for case, drop, with_pose in (("first clip (no motion, no pose)", True, False),
                                  ("later clip (motion + pose)", False, True)):
        with torch.no_grad():
            want = official([x[0]], t=t, context=[context], seq_len=None, ref_latents=[ref[0]],
                            motion_latents=[motion[0]], cond_states=[pose[0] if with_pose else pose[0] * 0],
                            audio_input=audio, motion_frames=[s2v.motion_frames, s2v.motion_latents],
                            drop_motion_frames=drop)[0]
            got = ours(x, t, [context], s2v=S2VConditions(ref, audio, None if drop else motion,
                                                          pose if with_pose else None))[0]
        results[case] = rel(got, want)
    return results


def audio_parity(audio_encoder) -> dict:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from wanlite.pipelines.audio import SpeechEncoder, frame_features, resample_features

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32,) * 7, vocab_size=32, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer")
    wave = (np.sin(np.linspace(0, 900, 16000 * 3 + 1234)) * 0.3 + np.random.default_rng(0).normal(0, 0.05, 16000 * 3 + 1234)).astype(np.float32)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        Wav2Vec2ForCTC(config).save_pretrained(tmp)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(tmp)
        official = object.__new__(audio_encoder.AudioEncoder)  # its __init__ wants a tokenizer folder too
        official.processor = Wav2Vec2FeatureExtractor.from_pretrained(tmp)
        official.model = Wav2Vec2ForCTC.from_pretrained(tmp).eval()
        official.video_rate = 30
        audio_encoder.librosa.load = lambda path, sr: (wave, sr)
        for clip_frames in (80, 12):
            with torch.no_grad():
                z = official.extract_audio_feat("speech.wav", return_all_layers=True)
            want, want_clips = official.get_audio_embed_bucket_fps(z, fps=16, batch_frames=clip_frames, m=0)
            want = want.permute(1, 2, 0)  # [frames, L, C] -> [L, C, frames], as speech2video.encode_audio
            got, clips = frame_features(resample_features(SpeechEncoder(Path(tmp)).hidden_states(wave)), 16,
                                        clip_frames)
            if clips != want_clips or got.shape != want.shape:
                raise RuntimeError(f"clip count / shape differ: {clips} {tuple(got.shape)} vs {want_clips} "
                                   f"{tuple(want.shape)}")
            results[f"{clip_frames}-frame clips ({clips} clips)"] = rel(got, want)
    return results


def main() -> int:
    root = official_checkout(__doc__)
    model_s2v, audio_encoder = load(root)
    dit, audio = dit_parity(model_s2v), audio_parity(audio_encoder)
    for name, err in {**dit, **audio}.items():
        print(f"{name:38s} max relative error {err:.2e}")
    worst = max([*dit.values(), *audio.values()])
    write_json("s2v_parity", {**provenance("s2v_parity.py", root), "dtype": "float32", "target_max_rel_err": 1e-4,
                              "max_rel_err": worst, "dit": dit, "audio_features": audio})
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
