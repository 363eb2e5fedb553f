"""LoRA files for Wan DiTs: read them safely and map every key format onto the model's own module names.

Formats, detected from the keys (facts: research/caching-lora.md section 7):
- native Wan (`[diffusion_model.]blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` / `.alpha`, or PEFT's
  `.lora_A.weight` / `.lora_B.weight`), with full-weight deltas `.diff` (weight), `.diff_b` (bias) and `.diff_m`
  (a block's modulation);
- kohya / musubi-tuner (`lora_unet_blocks_0_self_attn_q.lora_down.weight`);
- diffusers (`transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.bias` = a bias delta).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanlite.errors import WanliteError
from wanlite.loading.keymaps import official_name

# diffusers module names -> the official ones WanDiT uses (diffusers' lora_conversion_utils, read as facts)
DIFFUSERS_NAMES = (
    (r"\.attn1\.to_q$", ".self_attn.q"), (r"\.attn1\.to_k$", ".self_attn.k"), (r"\.attn1\.to_v$", ".self_attn.v"),
    (r"\.attn1\.to_out\.0$", ".self_attn.o"), (r"\.attn2\.to_q$", ".cross_attn.q"),
    (r"\.attn2\.to_k$", ".cross_attn.k"), (r"\.attn2\.to_v$", ".cross_attn.v"),
    (r"\.attn2\.to_out\.0$", ".cross_attn.o"), (r"\.attn2\.add_k_proj$", ".cross_attn.k_img"),
    (r"\.attn2\.add_v_proj$", ".cross_attn.v_img"), (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"), (r"^proj_out$", "head.head"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"\.norm2$", ".norm3"),
)
LOW_RANK = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
            "alpha": "alpha", "diff": "diff", "diff_b": "diff_b", "lora_B.bias": "diff_b", "diff_m": "diff_m"}


@dataclass
class LowRank:
    """One module's update: W += scale * up @ down, scale = strength * alpha / rank (alpha absent: rank)."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    """A LoRA mapped onto a model's names: low-rank pairs per Linear and full deltas per parameter."""

    path: Path
    format: str  # native | kohya | diffusers
    low_rank: dict[str, LowRank] = field(default_factory=dict)  # module name -> pair
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> delta
    unmatched: list[str] = field(default_factory=list)  # file keys that name nothing in the model

    @property
    def rank(self) -> int:
        """The largest rank among its pairs (what a runtime branch adds per layer)."""
        return max((pair.rank for pair in self.low_rank.values()), default=0)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a .pt/.pth/.ckpt through `torch.load(weights_only=True)`."""
    if not path.is_file():
        raise WanliteError(f"--lora {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (every parser failure means the same thing to the user)
        raise WanliteError(f"--lora {path}: not a readable LoRA file ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WanliteError(f"--lora {path}: holds no tensor dictionary, so it is not a LoRA")
    return data


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("transformer.") or ".attn1." in k or ".attn2." in k for k in keys):
        return "diffusers"
    return "native"


def _split(key: str) -> tuple[str, str] | None:
    """'blocks.0.self_attn.q.lora_down.weight' -> ('blocks.0.self_attn.q', 'down'); None for other keys."""
    for suffix in sorted(LOW_RANK, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], LOW_RANK[suffix]
    return None


def map_lora(path: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> LoraFile:
    """Map a LoRA's keys onto `model`; shapes are checked against the model's weights (wrong architecture ->
    one clear error). Keys naming nothing in the model are kept in `unmatched` for the caller to report."""
    fmt = detect_format(tensors)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    # LoRAs name S2V injectors / Animate face adapters as the official checkpoint does
    official = {official_name(name, getattr(model, "spec", None)): name for name in modules}
    flat = {name.replace(".", "_"): ours for name, ours in official.items()}  # kohya joins the path with underscores
    flat.update({name.replace(".", "_"): name for name in modules})
    out = LoraFile(path, fmt)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            out.unmatched.append(key)
            continue
        name, part = split
        if fmt == "kohya":
            name = flat.get(name.removeprefix("lora_unet_"), name)
        else:
            # PEFT state dicts (Animate's relighting LoRA) prefix the wrapped model: base_model.model.blocks...
            name = name.removeprefix("base_model.model.")
            name = name.removeprefix("diffusion_model.").removeprefix("transformer.").removeprefix("model.")
            if fmt == "diffusers":
                for pattern, repl in DIFFUSERS_NAMES:
                    name = re.sub(pattern, repl, name)
            name = official.get(name, name)
        parts.setdefault(name, {})[part] = tensor
    for name, got in parts.items():
        if "diff_m" in got:
            target = f"{name}.modulation"
            _delta(out, params, target, got.pop("diff_m"), path)
        if "diff" in got:
            _delta(out, params, f"{name}.weight", got.pop("diff"), path)
        if "diff_b" in got:
            _delta(out, params, f"{name}.bias", got.pop("diff_b"), path)
        if not got:
            continue
        if name not in modules:
            out.unmatched += [f"{name}.{p}" for p in got]
            continue
        if "down" not in got or "up" not in got:
            raise WanliteError(f"--lora {path}: {name} has only the {' and '.join(got)} of a low-rank pair; "
                               "the file is incomplete")
        down, up = got["down"], got["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise WanliteError(f"--lora {path}: {name} pairs a rank-{down.shape[0]} down matrix "
                               f"{tuple(down.shape)} with an up matrix {tuple(up.shape)} (rank mismatch)")
        want = _weight_shape(modules[name])
        if want is None or (up.shape[0], down.shape[1]) != want:
            raise WanliteError(f"--lora {path}: {name} is {tuple(want or ())} in this model but the LoRA changes a "
                               f"{(up.shape[0], down.shape[1])} weight; it was made for another architecture or task")
        alpha = got.get("alpha")
        out.low_rank[name] = LowRank(down, up, None if alpha is None else float(alpha))
    if not out.low_rank and not out.deltas:
        raise WanliteError(f"--lora {path}: none of its {len(tensors)} keys names a layer of this model "
                           f"(first: {next(iter(tensors), '-')!r}); it is not a Wan LoRA for this task")
    return out


def _weight_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    shape = getattr(module, "weight_shape", None)  # QLinear keeps its logical shape
    if shape is None and getattr(module, "weight", None) is not None:
        shape = tuple(module.weight.shape)
    return tuple(shape) if shape is not None and len(shape) == 2 else None


def _delta(out: LoraFile, params: dict, name: str, tensor: torch.Tensor, path: Path) -> None:
    if name not in params:
        out.unmatched.append(name)
        return
    if tuple(params[name].shape) != tuple(tensor.shape):
        raise WanliteError(f"--lora {path}: the delta for {name} is {tuple(tensor.shape)} but the model's is "
                           f"{tuple(params[name].shape)}; it was made for another architecture or task")
    out.deltas[name] = tensor
