"""Full-size architectures by name, built on the `meta` device: manifests and sizes without any memory."""
from __future__ import annotations

import torch

from wanlite.specs import DIT_SPECS, T5_SPECS, VAE_SPECS

ARCHS = tuple(DIT_SPECS) + tuple(VAE_SPECS) + tuple(T5_SPECS)


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    """The official state-dict `{key: shape}` of architecture `name`."""
    if name in DIT_SPECS:
        from wanlite.loading.keymaps import animate_key_to_official, s2v_key_to_official
        from wanlite.models.dit import WanDiT

        spec = DIT_SPECS[name]
        with torch.device("meta"):
            model = WanDiT(spec)
        if spec.s2v is not None:
            layers = spec.s2v.inject_layers
            return {s2v_key_to_official(k, layers): tuple(v.shape) for k, v in model.state_dict().items()}
        if spec.animate is not None:
            every = spec.animate.face_every
            return {animate_key_to_official(k, every): tuple(v.shape) for k, v in model.state_dict().items()}
    elif name in VAE_SPECS:
        from wanlite.models.vae import WanVAE

        with torch.device("meta"):
            model = WanVAE(VAE_SPECS[name])
    elif name in T5_SPECS:
        from wanlite.models.t5 import official_umt5_manifest

        return {k: tuple(v) for k, v in official_umt5_manifest(T5_SPECS[name]).items()}
    else:
        raise KeyError(name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
