"""LoRA files for Wan DiTs: read them safely and map every key format onto the model's own module names.

Formats, detected from the keys (facts: research/caching-lora.md section 7):
- native Wan (`[diffusion_model.]blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` / `.alpha`, or PEFT's
  `.lora_A.weight` / `.lora_B.weight`), with full-weight deltas `.diff` (weight), `.diff_b` (bias) and `.diff_m`
  (a block's modulation);
- kohya / musubi-tuner (`lora_unet_blocks_0_self_attn_q.lora_down.weight`);
- diffusers (`transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.bias` = a bias delta);
- LyCORIS LoHa (`.hada_w1_a/_b`, `.hada_w2_a/_b`: W += alpha/r1 * (w1_a w1_b) * (w2_a w2_b), elementwise) and LoKr
  (`.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b`: W += scale * kron(w1, w2)), as musubi-tuner,
  diffusion-pipe and LyCORIS write them, in any of the naming schemes above;
- PEFT adapter folders (`adapter_model.safetensors` + `adapter_config.json`: `lora_alpha`, `r`, their per-module
  patterns, `use_rslora`);
- ai-toolkit's Wan2.2 14B files holding both experts (`transformer_1.` = high noise, `transformer_2.` = low noise).
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
            "alpha": "alpha", "diff": "diff", "diff_b": "diff_b", "lora_B.bias": "diff_b", "diff_m": "diff_m",
            **{f: f for f in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                              "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_t1", "hada_t2", "lokr_t2")}}
NETWORK_KEYS = ("lokr_factor",)  # musubi-tuner's LoKr records its factorization: a fact about the file, no layer
EXPERT_HALVES = {"high_noise": "transformer_1", "low_noise": "transformer_2"}  # ai-toolkit's two-expert files


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
class Kron:
    """One module's LoKr update: W += scale * kron(w1, w2), w2 = w2_a @ w2_b when stored low-rank (w2_b None:
    w2_a is the full w2). Applied at run time without forming the product: for x viewed as [.., b1, b2],
    kron(w1, w2) x = w1 X w2^T."""

    w1: torch.Tensor  # [a1, b1]
    w2_a: torch.Tensor  # [a2, r] (or the full [a2, b2])
    w2_b: torch.Tensor | None  # [r, b2]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        b2 = self.w2_a.shape[1] if self.w2_b is None else self.w2_b.shape[1]
        return self.w1.shape[0] * self.w2_a.shape[0], self.w1.shape[1] * b2

    def w2(self) -> torch.Tensor:
        return self.w2_a.float() if self.w2_b is None else self.w2_a.float() @ self.w2_b.float()

    def delta(self) -> torch.Tensor:
        return torch.kron(self.w1.float(), self.w2()) * self.scale


@dataclass
class LoraFile:
    """A LoRA mapped onto a model's names: low-rank pairs per Linear and full deltas per parameter."""

    path: Path
    format: str  # native | kohya | diffusers
    low_rank: dict[str, LowRank] = field(default_factory=dict)  # module name -> pair (LoHa too: exact, rank r1*r2)
    kron: dict[str, Kron] = field(default_factory=dict)  # module name -> LoKr update
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> delta
    unmatched: list[str] = field(default_factory=list)  # file keys that name nothing in the model

    @property
    def rank(self) -> int:
        """The largest rank among its pairs (what a runtime branch adds per layer)."""
        return max((pair.rank for pair in self.low_rank.values()), default=0)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a .pt/.pth/.ckpt through `torch.load(weights_only=True)`; a PEFT
    adapter folder (or its adapter_model file) with the config's alpha written as each pair's `.alpha`."""
    config = None
    if path.is_dir() or (path.name.startswith("adapter_model.") and (path.parent / "adapter_config.json").is_file()):
        folder = path if path.is_dir() else path.parent
        config = _peft_config(folder)
        path = next((folder / name for name in ("adapter_model.safetensors", "adapter_model.bin")
                     if (folder / name).is_file()), folder / "adapter_model.safetensors")
    if not path.is_file():
        raise WanliteError(f"--lora {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (every parser failure means the same thing to the user)
        raise WanliteError(f"--lora {path}: not a readable LoRA file ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WanliteError(f"--lora {path}: holds no tensor dictionary, so it is not a LoRA")
    data = data if config is None else _with_peft_alphas(data, config, path)
    check_finite(data, path)
    return data


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A NaN or Inf anywhere (a weight, an alpha) would turn every frame black: refuse the file instead."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        t = t.half() if t.element_size() == 1 else t  # fp8: isfinite has no kernel; fp16 holds every fp8 value
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WanliteError(f"--lora {path}: {key} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}; the file is "
                               "damaged (download or export it again)")


def _peft_config(folder: Path) -> dict:
    import json

    file = folder / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WanliteError(f"--lora {folder}: a PEFT adapter needs a readable adapter_config.json "
                           f"({exc.__class__.__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), (int, float)) or config["r"] <= 0:
        raise WanliteError(f"--lora {file}: expected the adapter's rank as \"r\" (a positive number)")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key the module name ends with."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(value)
    return float(default)


def _with_peft_alphas(data: dict, config: dict, path: Path) -> dict:
    """PEFT scales each pair by lora_alpha / r (alpha / sqrt(r) with use_rslora); written as the `.alpha` the
    update's scale reads (alpha / rank), so the file means what PEFT applies."""
    import math

    out = dict(data)
    for key, down in data.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rank = down.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", config["r"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[f"{module}.alpha"] = torch.tensor(scale * rank)
    return out


def expert_half(tensors: dict[str, torch.Tensor], role: str, path: Path) -> dict[str, torch.Tensor]:
    """ai-toolkit writes a Wan2.2 14B LoRA whose stages are not split as one file, `transformer_1.` (the
    high-noise expert) and `transformer_2.` keys: the half for `role`, without that segment. Other files as
    they are."""
    halves = re.compile(r"(^|\.)(transformer_[12])\.")
    if not any(halves.search(k) for k in tensors):
        return tensors
    if role not in EXPERT_HALVES:
        raise WanliteError(f"--lora {path}: holds LoRAs for two experts (ai-toolkit's transformer_1 / transformer_2) "
                           "but this task has one transformer; use a LoRA made for it")
    return {halves.sub(r"\1", k, count=1): v for k, v in tensors.items()
            if (m := halves.search(k)) is not None and m.group(2) == EXPERT_HALVES[role]}


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
            if key not in NETWORK_KEYS:
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
        want = _weight_shape(modules[name])
        if any(p.startswith(("hada_", "lokr_")) for p in got):
            update = _lycoris(name, got, path, "lokr_factor" in tensors)
            shape = update.shape if isinstance(update, Kron) else (update.up.shape[0], update.down.shape[1])
            if want is None or tuple(shape) != want:
                raise WanliteError(f"--lora {path}: {name} is {tuple(want or ())} in this model but the LoRA changes "
                                   f"a {tuple(shape)} weight; it was made for another architecture or task")
            (out.kron if isinstance(update, Kron) else out.low_rank)[name] = update
            continue
        if "down" not in got or "up" not in got:
            raise WanliteError(f"--lora {path}: {name} has only the {' and '.join(got)} of a low-rank pair; "
                               "the file is incomplete")
        down, up = got["down"], got["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise WanliteError(f"--lora {path}: {name} pairs a rank-{down.shape[0]} down matrix "
                               f"{tuple(down.shape)} with an up matrix {tuple(up.shape)} (rank mismatch)")
        if want is None or (up.shape[0], down.shape[1]) != want:
            raise WanliteError(f"--lora {path}: {name} is {tuple(want or ())} in this model but the LoRA changes a "
                               f"{(up.shape[0], down.shape[1])} weight; it was made for another architecture or task")
        alpha = got.get("alpha")
        out.low_rank[name] = LowRank(down, up, None if alpha is None else float(alpha))
    if not out.low_rank and not out.kron and not out.deltas:
        raise WanliteError(f"--lora {path}: none of its {len(tensors)} keys names a layer of this model "
                           f"(first: {next(iter(tensors), '-')!r}); it is not a Wan LoRA for this task")
    return out


def _lycoris(name: str, got: dict, path: Path, musubi: bool) -> LowRank | Kron:
    """A LoHa as the exact low-rank pair of rank r1*r2 its Hadamard product is, or a LoKr. Scales as LyCORIS and
    ComfyUI read them: alpha / rank of the low-rank factor (LoHa: w1_b's rows; LoKr: w1_b's, else w2_b's), 1 when
    a LoKr has no low-rank factor; musubi-tuner's LoKr (it records `lokr_factor`) divides a full w2's alpha by
    its larger side instead."""
    def need(*parts: str) -> list[torch.Tensor]:
        missing = [p for p in parts if p not in got]
        if missing:
            raise WanliteError(f"--lora {path}: {name} has {', '.join(sorted(got))} but not {', '.join(missing)}; "
                               "the LyCORIS file is incomplete")
        return [got[p].float() for p in parts]

    if "hada_t1" in got or "hada_t2" in got or "lokr_t2" in got:
        raise WanliteError(f"--lora {path}: {name} is a Tucker-decomposed LyCORIS update (for convolutions); Wan's "
                           "layers are Linear, so the file was made for another model")
    alpha = float(got["alpha"]) if "alpha" in got else None
    if any(p.startswith("hada_") for p in got):
        w1a, w1b, w2a, w2b = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        scale = 1.0 if alpha is None else alpha / w1b.shape[0]
        down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
        up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1) * scale
        return LowRank(down, up)
    w1 = need("lokr_w1")[0] if "lokr_w1" in got else torch.matmul(*need("lokr_w1_a", "lokr_w1_b"))
    w2_a, w2_b = (need("lokr_w2")[0], None) if "lokr_w2" in got else need("lokr_w2_a", "lokr_w2_b")
    rank = w2_b.shape[0] if w2_b is not None else got["lokr_w1_b"].shape[0] if "lokr_w1_b" in got else None
    if musubi and rank is None:
        rank = max(w2_a.shape)
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    return Kron(w1, w2_a, w2_b, scale)


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
