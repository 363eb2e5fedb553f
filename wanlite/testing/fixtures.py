"""Write tiny random Wan checkpoints in the real on-disk layouts, so every loader path runs without downloads.

Layouts: "official" (HF `Wan-AI/Wan2.2-*` repos), "diffusers" (`*-Diffusers` repos) and "comfy" (ComfyUI
`models/` single files). The networks are the real classes at the tiny sizes of `wanlite.specs`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from wanlite.loading.keymaps import animate_key_to_official, dit_key_to_diffusers, s2v_key_to_official
from wanlite.loading.vae_keymap import vae_key_to_diffusers
from wanlite.loading.writers import save_pth, save_safetensors, write_json, write_shards
from wanlite.models.dit import WanDiT
from wanlite.models.t5 import build_umt5, official_name_from_umt5, umt5_config
from wanlite.models.vae import WanVAE
from wanlite.specs import TASKS, TINY_DIT_SPECS, TINY_T5, TINY_VAE_SPECS, DiTSpec
from wanlite.testing.tokenizer import write_tiny_tokenizer

LAYOUTS = ("official", "diffusers", "comfy")
BOUNDARY = {"t2v-A14B": 0.875, "i2v-A14B": 0.9}


def official_dit_config(spec: DiTSpec) -> dict:
    config = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": spec.dim, "eps": spec.eps,
              "ffn_dim": spec.ffn_dim, "freq_dim": spec.freq_dim, "in_dim": spec.in_dim,
              "model_type": spec.model_type, "num_heads": spec.num_heads, "num_layers": spec.num_layers,
              "out_dim": spec.out_dim, "text_len": spec.text_len}
    if spec.animate is not None:
        config.update({"_class_name": "WanAnimateModel", "motion_encoder_dim": spec.animate.motion_dim,
                       "use_img_emb": True})
    if spec.s2v is not None:  # the released S2V config.json's extra fields
        s2v = spec.s2v
        config.update({"_class_name": "WanModel_S2V", "audio_dim": s2v.audio_dim, "num_audio_token": s2v.audio_tokens,
                       "audio_inject_layers": list(s2v.inject_layers), "cond_dim": s2v.cond_dim,
                       "enable_adain": True, "adain_mode": "attn_norm", "enable_framepack": True,
                       "enable_motioner": False, "framepack_drop_mode": "padd", "zero_init": True,
                       "zero_timestep": True, "add_last_motion": True, "trainable_token_pos_emb": False,
                       "motion_frames": s2v.motion_frames})
    return config


def official_dit_tensors(dit: WanDiT) -> dict[str, torch.Tensor]:
    """The DiT's state dict under the official checkpoint's names (S2V: injectors in their top-level list)."""
    state = dict(dit.state_dict())
    if dit.spec.s2v is not None:
        layers = dit.spec.s2v.inject_layers
        return {s2v_key_to_official(k, layers): v for k, v in state.items()}
    if dit.spec.animate is not None:
        every = dit.spec.animate.face_every
        return {animate_key_to_official(k, every): v for k, v in state.items()}
    return state


def write_tiny_relighting_lora(path: Path, dit: WanDiT, seed: int = 0, rank: int = 4) -> Path:
    """A PEFT-style LoRA ({"state_dict": ...} in a .ckpt, keys `base_model.model.blocks.N.<linear>.lora_A/B.weight`)
    on the linears the official relighting LoRA targets: every block Linear outside the face adapters."""
    g = torch.Generator().manual_seed(seed + 7)
    state = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks" in name and "face" not in name and "audio" not in name:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    torch.save({"state_dict": state}, path)
    return path


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random tiny CLIP vision tower saved under the official open-clip checkpoint's names (`visual.*`, one
    block more than Animate reads, a stand-in text tower)."""
    from wanlite.models.clip import TINY_CLIP, build_clip_vision, state_prefix

    torch.manual_seed(seed)
    model = build_clip_vision(TINY_CLIP)
    prefix = state_prefix(model)
    st = {k.removeprefix(prefix): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {"visual.patch_embedding.weight": st["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": st["embeddings.class_embedding"].view(1, 1, -1),
           "visual.pos_embedding": st["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": st["pre_layrnorm.weight"], "visual.pre_norm.bias": st["pre_layrnorm.bias"],
           "visual.post_norm.weight": st["post_layernorm.weight"], "visual.post_norm.bias": st["post_layernorm.bias"],
           "visual.head": torch.randn(TINY_CLIP.dim, 16), "textual.token_embedding.weight": torch.randn(10, 8)}
    for i in range(TINY_CLIP.layers_used + 1):
        src, dst = f"encoder.layers.{min(i, TINY_CLIP.layers_used - 1)}.", f"visual.transformer.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{leaf}"] = torch.cat([st[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                                 ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
                out[dst + f"{theirs}.{leaf}"] = st[src + f"{ours}.{leaf}"]
    save_pth(out, path)
    return path


def write_tiny_wav2vec(folder: Path, spec: DiTSpec, seed: int = 0) -> Path:
    """A random transformers Wav2Vec2ForCTC folder whose hidden states fit the tiny S2V audio encoder."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    s2v = spec.s2v
    config = Wav2Vec2Config(hidden_size=s2v.audio_dim, num_hidden_layers=s2v.audio_layers - 1, num_attention_heads=2,
                            intermediate_size=2 * s2v.audio_dim, conv_dim=(32,) * 7, vocab_size=32,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                            feat_extract_norm="layer")
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def diffusers_dit_config(spec: DiTSpec) -> dict:
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(spec.patch_size),
            "num_attention_heads": spec.num_heads, "attention_head_dim": spec.head_dim, "in_channels": spec.in_dim,
            "out_channels": spec.out_dim, "text_dim": spec.text_dim, "freq_dim": spec.freq_dim,
            "ffn_dim": spec.ffn_dim, "num_layers": spec.num_layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": spec.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024}


def _t5_hf_tensors(t5) -> dict[str, torch.Tensor]:
    # embed_tokens is tied to `shared`; stored once, as transformers' save_pretrained does
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def build_tiny_models(task: str, seed: int = 0):
    """Random tiny DiT expert(s), VAE and umT5 for `task`, deterministic in `seed`."""
    torch.manual_seed(seed)
    spec = TINY_DIT_SPECS[task]
    dits = {role: WanDiT(spec).eval() for role in TASKS[task].experts}
    vae = WanVAE(TINY_VAE_SPECS[TASKS[task].vae]).eval()
    t5 = build_umt5(TINY_T5)
    with torch.no_grad():
        for p in t5.parameters():
            p.normal_(0, 0.05)
    return dits, vae, t5.eval()


def write_fixture(task: str, layout: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint for `task` in `layout` under `out`; returns the folder to load."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    out = Path(out)
    if TASKS[task].conditioning in ("speech", "animate") and layout != "official":
        raise ValueError(f"{task} fixtures exist in the official layout only")
    dits, vae, t5 = build_tiny_models(task, seed)
    version = TINY_VAE_SPECS[TASKS[task].vae].version
    spec = TINY_DIT_SPECS[task]
    if layout == "official":
        for role, dit in dits.items():
            folder = out if role == "main" else out / f"{role}_model"
            write_shards(folder, "diffusion_pytorch_model", official_dit_tensors(dit))  # fp32, as released
            write_json(official_dit_config(spec), folder / "config.json")
        t5_official = {official_name_from_umt5(k): v.to(torch.bfloat16) for k, v in _t5_hf_tensors(t5).items()}
        save_pth(t5_official, out / "models_t5_umt5-xxl-enc-bf16.pth")
        save_pth(dict(vae.state_dict()), out / f"Wan{version}_VAE.pth")
        write_tiny_tokenizer(out / "google" / "umt5-xxl", TINY_T5.vocab_size)
        if spec.s2v is not None:
            write_tiny_wav2vec(out / "wav2vec2-large-xlsr-53-english", spec, seed)
        if spec.animate is not None:
            from wanlite.models.clip import CLIP_FILE

            write_tiny_clip(out / CLIP_FILE, seed)
            write_tiny_relighting_lora(out / "relighting_lora.ckpt", dits["main"], seed)
    elif layout == "diffusers":
        index = {"_class_name": "WanPipeline", "expand_timesteps": task == "ti2v-5B"}
        if task in BOUNDARY:
            index["boundary_ratio"] = BOUNDARY[task]
        write_json(index, out / "model_index.json")
        for role, dit in dits.items():
            folder = out / ("transformer_2" if role == "low_noise" else "transformer")
            save_safetensors({dit_key_to_diffusers(k): v for k, v in dit.state_dict().items()},
                  folder / "diffusion_pytorch_model.safetensors")
            write_json(diffusers_dit_config(spec), folder / "config.json")
        save_safetensors(_t5_hf_tensors(t5), out / "text_encoder" / "model.safetensors")
        write_json(umt5_config(TINY_T5).to_dict(), out / "text_encoder" / "config.json")
        write_tiny_tokenizer(out / "tokenizer", TINY_T5.vocab_size)
        blocks = vae.spec.num_res_blocks
        save_safetensors({vae_key_to_diffusers(k, version == "2.2", blocks): v for k, v in vae.state_dict().items()},
                         out / "vae" / "diffusion_pytorch_model.safetensors")
        write_json({"_class_name": "AutoencoderKLWan", "z_dim": vae.spec.z_dim, "num_res_blocks": blocks},
                   out / "vae" / "config.json")
    else:
        kind = task.split("-")[0]
        for role, dit in dits.items():
            name = (f"wan2.2_{kind}_{role}_14B_fp16.safetensors" if role != "main"
                    else "wan2.2_ti2v_5B_fp16.safetensors")
            save_safetensors({f"model.diffusion_model.{k}": v.half() for k, v in dit.state_dict().items()},
                  out / "diffusion_models" / name)
        save_safetensors({k: v.half() for k, v in _t5_hf_tensors(t5).items()}, out / "text_encoders" / "umt5_xxl_fp16.safetensors")
        write_tiny_tokenizer(out / "text_encoders" / "umt5-xxl", TINY_T5.vocab_size)
        vae_name = "wan_2.1_vae.safetensors" if version == "2.1" else "wan2.2_vae.safetensors"
        save_safetensors(dict(vae.state_dict()), out / "vae" / vae_name)
    return out
