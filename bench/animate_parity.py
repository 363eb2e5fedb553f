"""One-off numerical parity of wanlite's Animate-14B DiT against the official implementation, on CPU in fp32.

Usage: python bench/animate_parity.py --official PATH
PATH is a checkout of https://github.com/Wan-Video/Wan2.2 (see bench/_official.py for how it is imported).
Both sides get the same random weights (dim 256, 2 heads, 10 blocks so face adapters follow blocks 0 and 5;
every parameter randomised, the motion network's equalised weights included) and the same inputs: 3 latent
frames (reference + 2), pose latents, 5 face crops of 512x512, CLIP features, a prompt. Also compares the
face-motion network alone. Writes bench/results/animate_parity.json (max relative error; target <= 1e-4).
"""
from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import load_official, official_checkout, provenance, rel  # noqa: E402
from harness import write_json  # noqa: E402


def face_attention(q, k, v, **_):
    """Stands in for the official face blocks' flash attention: [B, S, H, D] in, [B, S, H*D] out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def parity(root: Path) -> dict:
    from wanlite.loading.keymaps import animate_key_from_official
    from wanlite.models.animate import AnimateConditions
    from wanlite.models.dit import WanDiT
    from wanlite.specs import TINY_DIT_SPECS, AnimateSpec

    model_animate, face_blocks = load_official(root, "wan.modules.animate.model_animate",
                                               "wan.modules.animate.face_blocks")
    face_blocks.attention = face_attention
    # the official classes fix the face network, face encoder width and CLIP width: only the DiT is small
    spec = replace(TINY_DIT_SPECS["animate-14B"], num_layers=10, animate=AnimateSpec())
    torch.manual_seed(0)
    official = model_animate.WanAnimateModel(
        dim=spec.dim, ffn_dim=spec.ffn_dim, num_heads=spec.num_heads, num_layers=spec.num_layers,
        text_dim=spec.text_dim, in_dim=spec.in_dim, out_dim=spec.out_dim).eval()
    with torch.no_grad():
        for name, p in official.named_parameters():  # zero-initialised parts must be exercised too
            scale = 1.0 if name.startswith("motion_encoder") else 0.05  # equalised-lr weights are N(0, 1)
            p.copy_(torch.randn_like(p) * scale)
    ours = WanDiT(spec).eval()
    every = spec.animate.face_every
    ours.load_state_dict({animate_key_from_official(k, every): v for k, v in official.state_dict().items()})

    g = torch.Generator().manual_seed(1)
    frames, h, w = 3, 16, 16
    x = torch.randn(1, 16, frames, h, w, generator=g)
    y = torch.randn(1, 20, frames, h, w, generator=g)
    pose = torch.randn(1, 16, frames - 1, h, w, generator=g)
    faces = torch.rand(1, 3, 5, 512, 512, generator=g) * 2 - 1
    clip = torch.randn(1, 257, 1280, generator=g)
    context = torch.randn(9, spec.text_dim, generator=g)
    t = torch.tensor([711.0])
    seq_len = frames * (h // 2) * (w // 2)
    with torch.no_grad():
        want_motion = official.motion_encoder.get_motion(faces[0].transpose(0, 1))
        got_motion = ours.motion_encoder(faces[0].transpose(0, 1))
        want = official([x[0]], t=t, clip_fea=clip, context=[context], seq_len=seq_len, y=[y[0]],
                        pose_latents=[pose[0]], face_pixel_values=faces)[0]
        got = ours(x, t, [context], y=y, animate=AnimateConditions(clip, pose, faces))[0]
    results = {"face motion network": rel(got_motion, want_motion), "dit forward": rel(got, want)}
    results["clip vision tower (31 of 32 blocks)"] = clip_parity(root)
    return results


def clip_parity(root: Path) -> float:
    """The official VisionTransformer (tiny: 28 px, patch 14, width 64, 3 blocks) against transformers'
    CLIPVisionModel holding its weights through wanlite's key mapping, both stopping one block early."""
    from wanlite.models.clip import ClipVisionSpec, build_clip_vision, clip_vision_tensors, state_prefix

    # torchvision and ftfy are not installed here; clip.py imports them only for its image transforms and text
    # tokenizer, neither used below
    for name in ("torchvision", "torchvision.transforms", "ftfy"):
        sys.modules.setdefault(name, types.ModuleType(name))
    clip, = load_official(root, "wan.modules.animate.clip")
    torch.manual_seed(0)
    official = clip.VisionTransformer(image_size=28, patch_size=14, dim=64, mlp_ratio=4, out_dim=32, num_heads=2,
                                      num_layers=3, pool_type="token", pre_norm=True, post_norm=False,
                                      activation="gelu").eval()
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    spec = ClipVisionSpec(image_size=28, patch_size=14, dim=64, heads=2, layers_used=2)
    ours = build_clip_vision(spec)
    state = clip_vision_tensors({"visual." + k: v for k, v in official.state_dict().items()}, spec, torch.float32,
                                state_prefix(ours))
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return rel(ours(pixel_values=x).last_hidden_state, official(x, use_31_block=True))


def main() -> int:
    root = official_checkout(__doc__)
    results = parity(root)
    for name, err in results.items():
        print(f"{name:36s} max relative error {err:.2e}")
    worst = max(results.values())
    write_json("animate_parity", {**provenance("animate_parity.py", root), "dtype": "float32",
                                  "target_max_rel_err": 1e-4, "max_rel_err": worst, "results": results})
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
