"""A wanlite video's record back to the request that made it (`wanlite generate --replay FILE.mp4`)."""
from __future__ import annotations

from pathlib import Path

from wanlite.cache.config import from_description
from wanlite.errors import WanliteError
from wanlite.pipelines.request import RELIGHTING_LORA, Request
from wanlite.specs import TASKS


def recorded_request(path: Path) -> Request:
    """The request whose resolved job is the one `path` records: its settings and every decision made explicit,
    so the same weights on the same machine give the same frames."""
    from wanlite.pipelines.video_io import read_mp4_metadata

    if not Path(path).is_file():
        raise WanliteError(f"--replay {path} does not exist")
    try:
        meta = read_mp4_metadata(Path(path))
    except ValueError as exc:
        raise WanliteError(f"--replay {path}: {exc}") from None
    job = None if meta is None else meta.get("job")
    if job is None:
        raise WanliteError(f"--replay {path} carries no wanlite job (made by another tool, re-encoded, or by a "
                           "wanlite older than the job record); pass the settings as flags instead")
    s, w, o = job["settings"], job["weights"], job["offload"]
    both, high, low = _lora_flags(job["loras"], TASKS[s["task"]].experts, s["relighting_lora"])
    modes = {lora["mode"] for lora in job["loras"]}
    optional = lambda value: None if value is None else Path(value)  # noqa: E731
    return Request(
        task=s["task"], prompt=s["prompt"], negative_prompt=s["negative_prompt"], ckpt_dir=optional(w["ckpt_dir"]),
        image=optional(s["image"]), size=tuple(s["size"]), frames=s["frames"], steps=s["steps"], shift=s["shift"],
        guide_scale=tuple(s["guide_scale"]), solver=s["solver"], seed=s["seed"], device=job["device"],
        dtype=job["dtype"], attention=job["attention"], cfg=job.get("cfg", "auto"),  # older records lack these two
        compile=job.get("compile", False), t5_cpu=job["text_encoder"]["device"] == "cpu", quant=w["quant"],
        quant_backend=w["quant_backend"], vae_tile=job["vae"]["tile"] or 0, vae_dtype=job["vae"]["dtype"],
        offload=o["mode"], resident_blocks=o["resident_blocks"], prefetch=o["prefetch"], ram_mode=o["ram_mode"],
        chunk_tokens=job["chunk_tokens"] or 0, offload_cache=optional(o["cache_dir"]),
        cache=from_description(job["step_cache"]) or "off", cache_force=job["step_cache"] is not None,
        lora=both, lora_high=high, lora_low=low, lora_mode=modes.pop() if len(modes) == 1 else "auto",
        preset=s.get("preset"), audio=optional(s["audio"]), pose_video=optional(s["pose_video"]),
        num_clip=s["num_clip"], start_from_ref=s["start_from_ref"], wav2vec=optional(job["wav2vec"]),
        src_root_path=optional(s["src_root_path"]), replace=s["replace"], refert_num=s["refert_num"],
        relighting_lora=s["relighting_lora"], **{flag: Path(file) for flag, file in w["files"]})


def _lora_flags(loras: list[dict], roles: tuple[str, ...], relighting: bool) -> tuple[tuple[str, ...], ...]:
    """(--lora, --lora_high, --lora_low) from the per-expert LoRA lists: a file on every expert with one strength
    is a --lora, the rest belong to their expert; the relighting LoRA comes back through its own flag."""
    per_role = {role: [] for role in roles}
    for lora in loras:
        per_role[lora["role"]] = [f"{file}:{strength!r}" for file, strength in lora["files"]
                                  if not (relighting and Path(file).name == RELIGHTING_LORA)]
    shared = [f for f in per_role[roles[0]] if all(f in files for files in per_role.values())]
    rest = {role: tuple(f for f in files if f not in shared) for role, files in per_role.items()}
    return tuple(shared), rest.get("high_noise", ()), rest.get("low_noise", ())
