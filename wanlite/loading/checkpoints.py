"""Find the Wan components in a checkpoint folder by reading file headers, not by trusting names.

Supported layouts: the official HF repos (`high_noise_model/` + `low_noise_model/` shards, root shards for 5B,
`models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.x_VAE.pth`, `google/umt5-xxl/`), diffusers repos (`transformer/`,
`transformer_2/`, `text_encoder/`, `vae/`, `tokenizer/`) and ComfyUI single files (`model.diffusion_model.`
prefix). Folder and file names only decide which of two identical-looking A14B experts is which. A ComfyUI
`models/` folder (diffusion_models/, unet/, text_encoders/, clip/, vae/) holds many models: `comfy_components`
picks the files that fit a task by their tensors.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from wanlite.errors import CheckpointError
from wanlite.loading.keymaps import strip_comfy_prefix
from wanlite.files import regular_file_size
from wanlite.loading.safetensors_file import read_header
from wanlite.loading.stream import PTH_SUFFIXES, PthSource, sniff

WEIGHT_SUFFIXES = (".safetensors", ".gguf") + tuple(s for s in PTH_SUFFIXES if s != ".bin")
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
SKIP_DIRS = {"process_checkpoint", ".git", ".cache"}
MAX_DEPTH = 4

# (kind, naming) by a key that only that component has; keys are checked after stripping a ComfyUI prefix.
SIGNATURES = [
    ("dit", "official", "head.modulation"),
    ("dit", "diffusers", "condition_embedder.time_proj.weight"),
    ("t5", "official", "token_embedding.weight"),
    ("t5", "hf", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    ("vae", "official", "decoder.middle.0.residual.0.gamma"),
    ("vae", "diffusers", "decoder.mid_block.resnets.0.norm1.gamma"),
]
EXPERT_DIRS = {"high_noise_model": "high_noise", "low_noise_model": "low_noise",
               "transformer": "high_noise", "transformer_2": "low_noise"}  # diffusers: transformer = high noise
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
COMFY_SUBDIRS = ("diffusion_models", "unet", "text_encoders", "clip", "vae")  # where ComfyUI keeps each part
COMFY_MARKERS = (*COMFY_SUBDIRS, "loras", "checkpoints", "clip_vision")


@dataclass(frozen=True)
class Component:
    """One model's weights: its files (shards in order), key naming, layout and any config.json beside it."""

    kind: str  # "dit" | "t5" | "vae"
    naming: str  # "official" | "diffusers" | "hf"
    layout: str  # "official" | "diffusers" | "comfy" | "gguf"
    files: tuple[Path, ...]
    role: str = "main"  # "high_noise" | "low_noise" for A14B experts
    config: dict = field(default_factory=dict, compare=False)

    @property
    def where(self) -> Path:
        return self.files[0] if len(self.files) == 1 else self.files[0].parent


@dataclass(frozen=True)
class CheckpointSet:
    root: Path
    dits: dict[str, Component]
    t5: Component | None
    vae: Component | None
    tokenizer: Path | None


def _walk(root: Path, depth: int = 0):
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{root}: cannot list the folder ({exc.strerror or exc})") from None
    for entry in entries:
        if entry.is_dir():
            if depth < MAX_DEPTH and entry.name not in SKIP_DIRS and not entry.name.startswith("."):
                yield from _walk(entry, depth + 1)
        else:
            yield entry


def _read_index(index: Path) -> list[Path]:
    regular_file_size(index)  # a FIFO named *.index.json would block the read below
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map'); re-download it") from None
    paths = []
    for name in shards:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name")
        path = index.parent / name
        if not path.is_file():
            raise CheckpointError(f"{index}: lists shard {name}, which is missing; the download is incomplete")
        paths.append(path)
    return paths


def _group_files(files: list[Path]) -> list[tuple[Path, ...]]:
    """Shard groups (from an index.json or the -0000k-of-0000n pattern) and single files."""
    groups: list[tuple[Path, ...]] = []
    taken: set[Path] = set()
    for index in (f for f in files if f.name.endswith(".safetensors.index.json")):
        shards = _read_index(index)
        groups.append(tuple(shards))
        taken.update(shards)
    by_stem: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for f in files:
        if f in taken or not f.name.endswith(WEIGHT_SUFFIXES):
            continue
        m = SHARD_NAME.match(f.name)
        if m:
            by_stem[(f.parent, m["stem"] + "|" + m["total"])].append(f)
        else:
            groups.append((f,))
    for (parent, key), shards in by_stem.items():
        total = int(key.rsplit("|", 1)[1])
        if len(shards) != total:
            raise CheckpointError(
                f"{parent}: found {len(shards)} of {total} shards of {key.split('|')[0]}; the download is incomplete")
        groups.append(tuple(sorted(shards)))
    return groups


def _keys(group: tuple[Path, ...], strict: bool = False) -> set[str]:
    kind = sniff(group[0])
    if kind == "safetensors":
        keys: set[str] = set()
        for shard in group:
            keys.update(read_header(shard)[0])
        return keys
    if kind == "gguf":
        from wanlite.quant.gguf_file import NotWanGGUF, read_gguf

        try:
            return set(read_gguf(group[0]))
        except NotWanGGUF:  # another model's GGUF (a text encoder, an LLM) lying in the folder
            if strict:  # ...but named explicitly, the user deserves the reason
                raise
            return set()
    if kind == "pth":
        return set(PthSource(group[0]).tensors)
    return set()


def _classify(group: tuple[Path, ...], strict: bool = False) -> tuple[str, str, bool] | None:
    raw = _keys(group, strict)
    keys = {strip_comfy_prefix(k) for k in raw}
    prefixed = any(strip_comfy_prefix(k) != k for k in raw)
    for kind, naming, signature in SIGNATURES:
        if signature in keys:
            return kind, naming, prefixed
    return None


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON; re-download it") from None
    return data if isinstance(data, dict) else {}


def _expert_role(files: tuple[Path, ...]) -> str:
    folder = files[0].parent.name
    if folder in EXPERT_DIRS:
        return EXPERT_DIRS[folder]
    name = files[0].name.lower()
    for role, words in (("high_noise", ("high_noise", "high-noise", "highnoise")),
                        ("low_noise", ("low_noise", "low-noise", "lownoise"))):
        if any(w in name for w in words):
            return role
    return "main"


def discover(path: Path) -> CheckpointSet:
    """Inspect a checkpoint folder (or one file) and return the components it holds."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist; pass the folder you downloaded with --ckpt_dir")
    comfy = comfy_models_dir(root) == root  # several models: `comfy_components` picks the task's
    files = _comfy_files(root) if comfy else [root] if root.is_file() else list(_walk(root))
    dits: dict[str, Component] = {}
    found: dict[str, Component] = {}
    for group in _group_files(files):
        kind_naming = _classify(group)
        if kind_naming is None:
            continue
        kind, naming, prefixed = kind_naming
        folder = group[0].parent
        lone_file = len(group) == 1 and not SHARD_NAME.match(group[0].name)  # a one-shard set is still a set
        if sniff(group[0]) == "gguf":
            layout = "gguf"
        elif prefixed or (lone_file and kind == "dit" and folder.name not in EXPERT_DIRS):
            layout = "comfy"
        elif naming in ("diffusers", "hf") and (folder.parent / "model_index.json").is_file():
            layout = "diffusers"
        else:
            layout = "official"
        comp = Component(kind, naming, layout, group, config=_config(folder))
        if kind == "dit":
            comp = Component(kind, naming, layout, group, _expert_role(group), comp.config)
            if comp.role in dits and comfy:
                continue
            if comp.role in dits:
                raise CheckpointError(
                    f"{root}: two {comp.role.replace('_', '-')} transformers found ({dits[comp.role].where} and "
                    f"{comp.where}); keep one per role or point --ckpt_dir at one model")
            dits[comp.role] = comp
        elif kind not in found:
            found[kind] = comp
    return CheckpointSet(root, dits, found.get("t5"), found.get("vae"), _find_tokenizer(root))


def _find_tokenizer(root: Path) -> Path | None:
    if root.is_file():
        return None
    candidates = [f.parent for f in _walk(root) if f.name in TOKENIZER_FILES]
    preferred = [c for c in candidates if c.name in ("umt5-xxl", "tokenizer")]
    return (preferred or candidates or [None])[0]


# --flag -> (component kind, expert role)
COMPONENT_FLAGS = {"high_noise_model": ("dit", "high_noise"), "low_noise_model": ("dit", "low_noise"),
                   "dit": ("dit", "main"), "t5": ("t5", None), "vae": ("vae", None)}
KIND_NAMES = {"dit": "a Wan transformer", "t5": "a umT5 text encoder", "vae": "a Wan VAE"}
FLAGS_FOR_KIND = {"dit": "--dit (or --high_noise_model / --low_noise_model)", "t5": "--t5", "vae": "--vae"}


def component_from_file(flag: str, path: Path) -> Component:
    """The component a `--high_noise_model/--low_noise_model/--dit/--t5/--vae FILE` holds, recognised by its
    tensors (safetensors of any dtype incl. fp8-scaled, GGUF or .pth), never by its name."""
    path = Path(path).expanduser()
    kind, role = COMPONENT_FLAGS[flag]
    if not path.is_file():
        raise CheckpointError(f"--{flag} {path}: no such file")
    found = _classify((path,), strict=True)
    if found is None:
        raise CheckpointError(f"--{flag} {path}: not {KIND_NAMES[kind]} (none of its tensor names is one wanlite "
                              "knows); check the file")
    got, naming, _ = found
    if got != kind:
        raise CheckpointError(f"--{flag} {path}: holds {KIND_NAMES[got]}, not {KIND_NAMES[kind]}; "
                              f"pass it with {FLAGS_FOR_KIND[got]}")
    layout = "gguf" if sniff(path) == "gguf" else "comfy"
    return Component(kind, naming, layout, (path,), role or "main", _config(path.parent))


def with_components(ckpt: CheckpointSet | None, files: dict[str, Path]) -> CheckpointSet:
    """`ckpt` (or nothing) with the components given on the command line put in place of its own."""
    comps = {flag: component_from_file(flag, path) for flag, path in files.items()}
    if ckpt is None:
        if not comps:
            raise CheckpointError("no checkpoint given; pass --ckpt_dir (or the component files: --dit / "
                                  "--high_noise_model --low_noise_model, --t5, --vae)")
        first = next(iter(comps.values())).files[0]
        ckpt = CheckpointSet(first.parent, {}, None, None, None)
    dits = dict(ckpt.dits)
    given_dits = {c.role: c for c in comps.values() if c.kind == "dit"}
    if given_dits:
        dits = {**{r: c for r, c in dits.items() if r != "main" and "main" not in given_dits}, **given_dits}
    t5 = comps["t5"] if "t5" in comps else ckpt.t5
    tokenizer = ckpt.tokenizer
    if tokenizer is None and t5 is not None:  # a ComfyUI text_encoders/ folder can hold the tokenizer files
        tokenizer = _find_tokenizer(t5.files[0].parent)
    return CheckpointSet(ckpt.root, dits, t5, comps["vae"] if "vae" in comps else ckpt.vae, tokenizer)


def comfy_models_dir(path: Path) -> Path | None:
    """The ComfyUI `models/` folder at `path` (or inside it, for the ComfyUI folder), known by its subfolders."""
    root = Path(path).expanduser()
    for folder in (root, root / "models"):
        if folder.is_dir() and sum((folder / sub).is_dir() for sub in COMFY_MARKERS) >= 2:
            return folder
    return None


def _comfy_files(root: Path) -> list[Path]:
    """The files of the component folders (not loras/, checkpoints/, upscale_models/, ...)."""
    return [f for sub in COMFY_SUBDIRS if (root / sub).is_dir() for f in _walk(root / sub, 1)]


def _fits(kind: str, group: tuple[Path, ...], task: str) -> bool:
    """Whether a transformer or VAE file is the one `task` runs: input channels and S2V / Animate modules for a
    transformer, latent channels for a VAE."""
    from wanlite.loading.stream import open_source
    from wanlite.specs import DIT_SPECS, TASKS, VAE_SPECS

    shapes = {strip_comfy_prefix(k): v for k, v in open_source(list(group)).shapes().items()}
    if kind == "vae":
        conv = shapes.get("decoder.conv1.weight") or shapes.get("decoder.conv_in.weight")
        return conv is not None and conv[1] == VAE_SPECS[TASKS[task].vae].z_dim
    spec = DIT_SPECS[TASKS[task].dit]
    patch = shapes.get("patch_embedding.weight")
    return (patch is not None and patch[1] == spec.in_dim
            and ("casual_audio_encoder.weights" in shapes) == (spec.s2v is not None)
            and ("face_encoder.out_proj.weight" in shapes) == (spec.animate is not None))


def comfy_components(root: Path, task: str, given: set[str] = frozenset()) -> dict[str, Path]:
    """{component flag: file} for the files of a ComfyUI models folder that fit `task`, read by their tensors
    (flags in `given` are the user's and skipped). Several files fitting one role stop with one line listing
    them and the flag that names one."""
    from wanlite.specs import TASKS

    roles = TASKS[task].experts
    wanted = {flag: (kind, role) for flag, (kind, role) in COMPONENT_FLAGS.items() if flag not in given
              and (kind != "dit" or role in roles)}
    if not wanted:
        return {}
    found: dict[str, list[Path]] = {flag: [] for flag in wanted}
    for group in _group_files(_comfy_files(root)):
        if len(group) != 1:  # ComfyUI components are single files
            continue
        kind_naming = _classify(group)
        if kind_naming is None:
            continue
        kind = kind_naming[0]
        for flag, (want_kind, role) in wanted.items():
            if want_kind == kind and (role in (None, "main") or _expert_role(group) == role) and (
                    kind == "t5" or _fits(kind, group, task)):
                found[flag].append(group[0])
    for flag, paths in found.items():
        if len(paths) > 1:
            kind, role = wanted[flag]
            what = f"the {role.replace('_', '-')} expert" if kind == "dit" and role != "main" else KIND_NAMES[kind]
            listed = ", ".join(str(p.relative_to(root)) for p in paths)
            raise CheckpointError(f"{root}: {len(paths)} files fit {what} of {task} ({listed}); name one with "
                                  f"--{flag} FILE")
    return {flag: paths[0] for flag, paths in found.items() if paths}


def locate(ckpt_dir, task: str | None, given: set[str] = frozenset()) -> tuple[Path, dict[str, Path]]:
    """`--ckpt_dir` as a user gives it: a folder, a Hugging Face repo id (its snapshot in the local cache) or
    a ComfyUI models folder. Returns the folder and, for a ComfyUI folder and a known task, the component files
    that fit the task (the flags in `given` are the user's own and stay)."""
    from wanlite.loading.hub import cached_snapshot

    root = cached_snapshot(str(ckpt_dir)) or Path(ckpt_dir).expanduser()
    comfy = comfy_models_dir(root)
    if comfy is None or task is None:
        return root, {}
    return comfy, comfy_components(comfy, task, given)
