"""Weights on the Hugging Face Hub: which files a task needs in a format (`wanlite download`), fetching them, and
`--ckpt_dir OWNER/NAME` read from the local Hugging Face cache.

The catalogue names repos and regular expressions over their file paths, with sizes estimated from the
architectures, so `--dry-run` needs no network; online, each repo's listing (model info with file sizes) turns
the patterns into real paths and sizes. huggingface_hub does the transfers: its token, its endpoint
(`HF_ENDPOINT`), requests resumed with Range after a dropped connection, files moved into place only when
complete.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wanlite.errors import WanliteError

OFFICIAL = {"t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B", "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
            "ti2v-5B": "Wan-AI/Wan2.2-TI2V-5B", "s2v-14B": "Wan-AI/Wan2.2-S2V-14B",
            "animate-14B": "Wan-AI/Wan2.2-Animate-14B"}
# Animate's diffusers twin needs its CLIP from the official repo and S2V has none: official or single files there
DIFFUSERS = {task: OFFICIAL[task] + "-Diffusers" for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B")}
COMFY = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMFY_T5 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"  # the umT5 files live in the Wan2.1 repack
GGUF_REPOS = {task: (f"QuantStack/{OFFICIAL[task].split('/')[1]}-GGUF",) for task in OFFICIAL}
GGUF_REPOS["t2v-A14B"] += ("bullerwins/Wan2.2-T2V-A14B-GGUF",)  # tried when QuantStack lacks the quant
GGUF_REPOS["i2v-A14B"] += ("bullerwins/Wan2.2-I2V-A14B-GGUF",)
# ComfyUI single-file stems ({role}: high_noise / low_noise) and the word their 16-bit files carry
COMFY_DIT = {"t2v-A14B": ("wan2.2_t2v_{role}_14B", "fp16"), "i2v-A14B": ("wan2.2_i2v_{role}_14B", "fp16"),
             "ti2v-5B": ("wan2.2_ti2v_5B", "fp16"), "s2v-14B": ("wan2.2_s2v_14B", "bf16"),
             "animate-14B": ("wan2.2_animate_14B", "bf16")}
STORED_FP8 = {"t2v-A14B", "i2v-A14B", "s2v-14B"}  # tasks Comfy-Org ships fp8_scaled files of
OFFICIAL_BITS = {"t2v-A14B": 32, "i2v-A14B": 32, "ti2v-5B": 32, "s2v-14B": 16, "animate-14B": 16}
# step-distillation LoRAs per task: (repo, path pattern with {role}, example path with {role}); A14B only
LORAS = {
    "lightning": {
        "t2v-A14B": ("lightx2v/Wan2.2-Lightning", r"^Wan2\.2-T2V-A14B-4steps-lora-rank64-Seko-V1\.1/{role}_model"
                     r"\.safetensors$", "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/{role}_model.safetensors"),
        "i2v-A14B": ("lightx2v/Wan2.2-Lightning", r"^Wan2\.2-I2V-A14B-4steps-lora-rank64-Seko-V1/{role}_model"
                     r"\.safetensors$", "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/{role}_model.safetensors")},
    "lightx2v": {  # dated releases (…_1217): the newest name wins
        "t2v-A14B": ("lightx2v/Wan2.2-Distill-Loras", r"(?i)^wan2\.2_t2v_a14b_{role}_lora_rank64_lightx2v_4step"
                     r"[^/]*\.safetensors$", "wan2.2_t2v_A14b_{role}_lora_rank64_lightx2v_4step_1217.safetensors"),
        "i2v-A14B": ("lightx2v/Wan2.2-Distill-Loras", r"(?i)^wan2\.2_i2v_a14b_{role}_lora_rank64_lightx2v_4step"
                     r"[^/]*\.safetensors$", "wan2.2_i2v_A14b_{role}_lora_rank64_lightx2v_4step_1022.safetensors")},
}
LORA_BYTES = 0.6e9  # rank 64 on every 14B block linear, 16-bit
# approximate bits per weight of the GGUF file types wanlite reads (the _M/_S mixes keep some tensors wider)
GGUF_BITS = {"q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_1": 6.0, "q5_0": 5.5, "q4_k_m": 4.9,
             "q4_k_s": 4.6, "q4_1": 5.0, "q4_0": 4.5, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4}
FORMATS = ("auto", "official", "diffusers", "bf16", "fp8", *(f"gguf-{q}" for q in GGUF_BITS))
# the planner's weight format -> the files to fetch (int8 is quantized from 16-bit files as they load)
PLANNED = {"bf16": "bf16", "int8": "bf16", "fp8": "fp8", "Q8_0": "gguf-q8_0", "Q6_K": "gguf-q6_k",
           "Q5_K": "gguf-q5_k_m", "Q4_K": "gguf-q4_k_m"}
TOKENIZER_BYTES = 21e6  # google/umt5-xxl: tokenizer.json + spiece.model
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Want:
    """What the plan needs from the Hub: the first of `repos` whose listing matches `pattern` provides it (one
    file, or every match with `many`); offline, `example` and `size` (bytes, estimated) stand in."""

    role: str
    repos: tuple[str, ...]
    pattern: str
    example: str
    size: float
    many: bool = False
    subdir: str = ""  # where under the destination it goes (LoRAs: loras/)


@dataclass(frozen=True)
class Fetch:
    """One file to fetch: `exact` when it comes from the repo's listing, else the catalogue's estimate."""

    role: str
    repo: str
    path: str
    size: float
    exact: bool
    revision: str = "main"
    subdir: str = ""


def _bytes16(arch: str) -> int:
    from wanlite.archs import manifest
    from wanlite.quant import weight_bytes

    return weight_bytes(manifest(arch), "bf16")


def _fmt_size(n: float, exact: bool) -> str:
    text = f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
    return ("" if exact else "~") + text


def wants(task: str, fmt: str, lora: str | None = None) -> list[Want]:
    """Every file `task` needs in `fmt` (a FORMATS value other than auto), plus the LoRA pair asked for."""
    from wanlite.specs import TASKS, VAE_SPECS

    spec = TASKS[task]
    official = (OFFICIAL[task],)
    roles = list(spec.experts)
    dit16 = _bytes16(spec.dit)
    version = VAE_SPECS[spec.vae].version
    label = lambda role: "transformer" if role == "main" else f"transformer ({role.replace('_', '-')})"  # noqa: E731
    out: list[Want] = []
    if fmt == "official":
        for role in roles:
            folder = "" if role == "main" else f"{role}_model/"
            out.append(Want(label(role), official, rf"^{re.escape(folder)}(config\.json|diffusion_pytorch_model[^/]*)$",
                            f"{folder}diffusion_pytorch_model-*.safetensors", dit16 * OFFICIAL_BITS[task] / 16, True))
        out.append(Want("text encoder", official, r"^models_t5_umt5-xxl-enc-bf16\.pth$",
                        "models_t5_umt5-xxl-enc-bf16.pth", _bytes16("umt5-xxl-encoder")))
        out.append(Want("VAE", official, rf"^Wan{re.escape(version)}_VAE\.pth$", f"Wan{version}_VAE.pth",
                        2 * _bytes16(spec.vae)))
    elif fmt == "diffusers":
        if task not in DIFFUSERS:
            raise WanliteError(f"--format diffusers: {task} has no diffusers repo wanlite reads; use --format "
                               "official, bf16, fp8 or gguf-...")
        repo = (DIFFUSERS[task],)
        for role in roles:
            folder = "transformer_2" if role == "low_noise" else "transformer"
            out.append(Want(label(role), repo, rf"^{folder}/[^/]+$", f"{folder}/*", dit16, True))
        out += [Want("text encoder", repo, r"^text_encoder/[^/]+$", "text_encoder/*", _bytes16("umt5-xxl-encoder"), True),
                Want("VAE", repo, r"^vae/[^/]+$", "vae/*", 2 * _bytes16(spec.vae), True),
                Want("tokenizer", repo, r"^(model_index\.json|tokenizer/[^/]+)$", "tokenizer/*", TOKENIZER_BYTES, True)]
    else:
        out += _single_file_dits(task, fmt, roles, label, dit16)
        t5 = "fp16" if fmt == "bf16" else "fp8_e4m3fn_scaled"  # GGUF transformers pair with the fp8 umT5
        out.append(Want("text encoder", (COMFY_T5,), rf"^split_files/text_encoders/umt5_xxl_{t5}\.safetensors$",
                        f"split_files/text_encoders/umt5_xxl_{t5}.safetensors",
                        _bytes16("umt5-xxl-encoder") * (1 if fmt == "bf16" else 0.6)))
        vae = "wan_2.1_vae" if version == "2.1" else "wan2.2_vae"
        out.append(Want("VAE", (COMFY,), rf"^split_files/vae/{re.escape(vae)}\.safetensors$",
                        f"split_files/vae/{vae}.safetensors", _bytes16(spec.vae)))
    if fmt != "diffusers":  # single files carry no tokenizer: the official repo's
        out.append(Want("tokenizer", official, r"^google/umt5-xxl/[^/]+$", "google/umt5-xxl/*", TOKENIZER_BYTES, True))
        out += _extras(task)
    if lora is not None:
        if lora not in LORAS or task not in LORAS[lora]:
            raise WanliteError(f"--lora {lora}: the Lightning / lightx2v 4-step LoRAs exist for t2v-A14B and "
                               f"i2v-A14B; drop --lora for {task}")
        repo, pattern, example = LORAS[lora][task]
        out += [Want(f"LoRA ({role.replace('_', '-')})", (repo,), pattern.replace("{role}", role),
                     example.replace("{role}", role), LORA_BYTES, subdir="loras") for role in roles]
    return out


def _single_file_dits(task: str, fmt: str, roles: list[str], label, dit16: int) -> list[Want]:
    """The transformer(s) as ComfyUI single files (bf16 / fp8) or community GGUF files, one per expert."""
    name = OFFICIAL[task].split("/")[1]  # Wan2.2-T2V-A14B
    out = []
    for role in roles:
        if fmt.startswith("gguf-"):
            quant = fmt.removeprefix("gguf-")
            word = "" if role == "main" else role.replace("_noise", "[_-]?noise")  # HighNoise, high_noise
            pattern = rf"(?i)^(?:.*/)?[^/]*{word}[^/]*[-_.]{re.escape(quant)}\.gguf$"
            tag = "" if role == "main" else role.replace("_noise", "").title() + "Noise"
            example = f"{tag}/{name}-{tag}-{quant.upper()}.gguf" if tag else f"{name}-{quant.upper()}.gguf"
            out.append(Want(label(role), GGUF_REPOS[task], pattern, example, dit16 * GGUF_BITS[quant] / 16))
            continue
        stem, word = COMFY_DIT[task]
        stem = stem.format(role=role)
        if fmt == "fp8" and task in STORED_FP8:
            suffix, size, word = r"_fp8_scaled", dit16 / 2, "fp8_scaled"
        else:  # no fp8 file published for the others: 16-bit, quantized to fp8 as it loads
            suffix, size = r"_(fp16|bf16)", dit16
        out.append(Want(label(role), (COMFY,), rf"^split_files/diffusion_models/{re.escape(stem)}{suffix}\.safetensors$",
                        f"split_files/diffusion_models/{stem}_{word}.safetensors", size))
    return out


def _extras(task: str) -> list[Want]:
    """What only the official repos hold: S2V's wav2vec2 folder, Animate's CLIP and relighting LoRA."""
    repo = (OFFICIAL[task],)
    if task == "s2v-14B":  # transformers' files only: not the flax / TF copies nor the CTC language model
        return [Want("wav2vec2", repo, r"^wav2vec2-large-xlsr-53-english/[^/]+\.(json|safetensors|txt)$",
                     "wav2vec2-large-xlsr-53-english/*", 1.27e9, True)]
    if task == "animate-14B":
        return [Want("CLIP image encoder", repo, r"^models_clip_open-clip-xlm-roberta-large-vit-huge-14\.pth$",
                     "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", 4.77e9),
                Want("relighting LoRA", repo, r"^relighting_lora\.ckpt$", "relighting_lora.ckpt", 1.44e9)]
    return []


def _hub_error(exc: Exception, what: str) -> WanliteError:
    """One line for a failed Hub request: what failed, why, and what to do."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    if isinstance(exc, GatedRepoError):
        return WanliteError(f"{what}: the repo is gated; accept its terms on its Hugging Face page and log in "
                            "(`hf auth login`), then run this again")
    if isinstance(exc, RepositoryNotFoundError):
        return WanliteError(f"{what}: no such repo (or it is private: log in with `hf auth login`); try "
                            "another --format")
    if isinstance(exc, RemoteEntryNotFoundError):
        return WanliteError(f"{what}: the file is gone from the repo (it changed after listing); run this again")
    if isinstance(exc, LocalEntryNotFoundError):
        return WanliteError(f"{what}: cannot reach the Hub; check the network (or HF_ENDPOINT) and run this "
                            "again: finished files are kept")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WanliteError(f"{what}: {first}; run this again: finished files are kept")


def _listing(repo: str, endpoint: str | None) -> tuple[str, dict[str, int]] | None:
    """(commit, {path: size}) of `repo`, None when it does not exist."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except GatedRepoError as exc:
        raise _hub_error(exc, f"listing {repo}") from None
    except RepositoryNotFoundError:
        return None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise WanliteError(f"listing {repo}: cannot reach the Hub ({str(exc).splitlines()[0]}); check the network "
                           "or HF_ENDPOINT, or add --dry-run to see the plan offline") from None
    return info.sha, {s.rfilename: s.size or 0 for s in info.siblings or ()}


def resolve_wants(items: list[Want], endpoint: str | None = None, offline: bool = False) -> list[Fetch]:
    """Patterns -> files: from each repo's listing, or (offline) the catalogue's examples and estimates."""
    if offline:
        return [Fetch(w.role, w.repos[0], w.example, w.size, False, subdir=w.subdir) for w in items]
    listings: dict[str, tuple[str, dict[str, int]] | None] = {}
    out = []
    for want in items:
        tried = []
        for repo in want.repos:
            if repo not in listings:
                listings[repo] = _listing(repo, endpoint)
            if listings[repo] is None:
                tried.append(f"{repo} (not found)")
                continue
            commit, files = listings[repo]
            found = sorted(p for p in files if re.search(want.pattern, p))
            if found:
                chosen = found if want.many else found[-1:]  # dated releases: the newest name
                out += [Fetch(want.role, repo, p, files[p], True, commit, want.subdir) for p in chosen]
                break
            tried.append(repo)
        else:
            raise WanliteError(f"{want.role}: no file like {want.example} in {', '.join(tried)}; the repo's layout "
                               "changed or lacks this format: try another --format")
    return out


def destination(task: str, fmt: str) -> Path:
    """The default --to: the official repo's name (as its README downloads it), plus the format."""
    name = OFFICIAL[task].split("/")[1]
    return Path(name if fmt == "official" else f"{name}-{fmt}")


def describe(task: str, fmt: str, fetches: list[Fetch], why: str, to: Path) -> list[str]:
    total = sum(f.size for f in fetches)
    exact = all(f.exact for f in fetches)
    lines = [f"{task} as {fmt}{f' ({why})' if why else ''}: {len(fetches)} files, {_fmt_size(total, exact)} "
             f"into {to}"]
    width = max(len(f.role) for f in fetches)
    repo_width = max(len(f.repo) for f in fetches)
    lines += [f"  {f.role:{width}s}  {f.repo:{repo_width}s}  {f.path}  {_fmt_size(f.size, f.exact)}"
              for f in fetches]
    return lines


def check_space(fetches: list[Fetch], to: Path) -> None:
    """Stop before the first byte when the files still missing from `to` do not fit its disk."""
    import shutil

    need = sum(f.size for f in fetches if not (to / f.subdir / f.path).is_file())
    where = next(p for p in (to.resolve(), *to.resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise WanliteError(f"{to}: the files need {_fmt_size(need, True)} but its disk has {_fmt_size(free, True)} "
                           "free; free some space or pass --to a folder on another disk")


def download(fetches: list[Fetch], to: Path, endpoint: str | None = None) -> None:
    """Fetch every file into `to` (its repo path kept, under the file's subdir); files already complete there
    are not fetched again. A file appears only once complete (huggingface_hub writes a temporary file and moves
    it), so a failed run leaves nothing half-written in place."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    for f in fetches:
        try:
            hf_hub_download(f.repo, f.path, revision=f.revision, local_dir=to / f.subdir, endpoint=endpoint)
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise _hub_error(exc, f"{f.repo}/{f.path}") from None


def ensure_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise WanliteError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it (or add --dry-run to see "
                           "what would be fetched)")


def cached_snapshot(value: str) -> Path | None:
    """`--ckpt_dir OWNER/NAME` that is not a folder here: that repo's snapshot in the Hugging Face cache
    (`HF_HOME` / `HF_HUB_CACHE`), found offline; None when `value` is a path or not a repo id."""
    if Path(value).expanduser().exists() or not REPO_ID.match(value):
        return None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(value, local_files_only=True))
    except LocalEntryNotFoundError:
        raise WanliteError(f"--ckpt_dir {value}: no such folder, and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                           f"holds no snapshot of that repo; download it (`hf download {value}`, or `wanlite "
                           "download --task TASK`) or pass a folder") from None
