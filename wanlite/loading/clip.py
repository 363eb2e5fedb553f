"""Load the CLIP vision tower Animate-14B conditions on from the official open-clip `.pth`."""
from __future__ import annotations

from pathlib import Path

import torch

from wanlite.errors import CheckpointError
from wanlite.loading.stream import PthSource
from wanlite.models.clip import (_BLOCK, CLIP_FILE, ClipVisionSpec, build_clip_vision, clip_vision_tensors,
                                 state_prefix)


def load_clip_vision(path: Path, spec: ClipVisionSpec | None = None, dtype: torch.dtype = torch.bfloat16):
    """The vision tower from the official `.pth` (torch.load weights_only, memory-mapped); every weight it
    needs must be there with the right shape."""
    source = PthSource(Path(path))
    tensors = {k: v for k, v in source.tensors.items() if k.startswith("visual.")}
    if "visual.pos_embedding" not in tensors:
        raise CheckpointError(f"{path}: no visual.pos_embedding; not the open-clip XLM-RoBERTa ViT-H/14 checkpoint "
                              f"({CLIP_FILE})")
    if spec is None:
        dim = tensors["visual.pos_embedding"].shape[-1]
        patch = tensors["visual.patch_embedding.weight"].shape[-1]
        tokens = tensors["visual.pos_embedding"].shape[-2]
        blocks = 1 + max(int(m[1]) for k in tensors if (m := _BLOCK.match(k)))
        spec = ClipVisionSpec(image_size=int(round((tokens - 1) ** 0.5)) * patch, patch_size=patch, dim=dim,
                              heads=max(1, dim // 80), layers_used=blocks - 1)
    with torch.device("meta"):
        model = build_clip_vision(spec)
    state = clip_vision_tensors(tensors, spec, dtype, state_prefix(model))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != want[k]]
    if missing or wrong:
        key = (missing or wrong)[0]
        raise CheckpointError(f"{path}: {'missing' if missing else 'wrong shape for'} {key} (as the ViT-H/14 vision "
                              f"tower needs it); use the official {CLIP_FILE}")
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # the one buffer not in the state dict: token positions 0..n-1
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).clone()
    return model.eval().requires_grad_(False)
