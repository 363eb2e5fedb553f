"""Hardware profiler and planner: `probe` / `load_or_probe` measure the machine, `make_plan` chooses, a
`Plan` is data (printed, saved as a profile, replayed). `plan_for_request` is what `resolve` uses."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wanlite.errors import WanliteError
from wanlite.planner.estimate import Workload
from wanlite.planner.plan import QUANT_FLAG, Plan, apply_profile, make_plan, plan_to_toml, read_profile
from wanlite.planner.probe import Hardware, hypothetical, load_or_probe

__all__ = ["Plan", "Hardware", "Workload", "make_plan", "plan_to_toml", "read_profile", "load_profile",
           "plan_for_request", "Placement", "PROFILES_DIR", "hardware_for", "hypothetical", "load_or_probe"]

PROFILES_DIR = Path(importlib.import_module("wanlite.profiles").__file__).parent  # the shipped presets
QUANT_FLAGS = tuple(QUANT_FLAG.values())


def load_profile(name: str) -> tuple[dict, str]:
    """A profile by name (`profiles/NAME.toml`, shipped presets) or path; returns (choices, where)."""
    path = Path(name)
    if path.suffix != ".toml":
        path = PROFILES_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) if PROFILES_DIR.is_dir() else []
        raise WanliteError(f"--profile {name}: no such profile file; give a .toml path or one of: "
                           f"{', '.join(['auto', *known])}")
    return read_profile(path.read_text(encoding="utf-8"), str(path)), str(path)


def hardware_for(choices: dict, device: torch.device) -> Hardware:
    """The profile's [hardware] when it has one, else this machine (measured once and cached on a GPU), with
    the memory free now."""
    if "gpu" in choices or "vram_gb" in choices or "ram_gb" in choices:
        return hypothetical(choices.get("vram_gb"), choices.get("ram_gb", 32), choices.get("disk_gbps", 2.0),
                            choices.get("gpu"))
    from wanlite.offload.memory import available_ram, total_ram

    if device.type == "cuda":  # the measurement is cached; the free memory is read now
        return replace(load_or_probe(), vram_free=torch.cuda.mem_get_info(device)[0], ram_available=available_ram())
    return Hardware(None, ram_total=total_ram(), ram_available=available_ram(), measured=True)


@dataclass(frozen=True)
class Placement:
    """What `generate` applies: the plan's choices after explicit flags."""

    plan: Plan | None  # None for the bundled tiny tasks
    quant: str
    offload: str
    resident_blocks: int
    prefetch: int
    ram_mode: str
    chunk_tokens: int | None
    vae_tile: int | None
    t5_cpu: bool
    cfg: str = "batched"  # batched | per_block
    t5_quant: str = ""  # the text encoder's format when the plan sets it apart from the transformer's
    extender_device: str = ""  # the local prompt extender's device and --quant ("": none, or not planned)
    extender_quant: str = ""


def plan_for_request(req, choices: dict, hw: Hardware, work: Workload, stored_quantized: bool) -> Placement:
    """Plan `work` on `hw` and merge the plan with the profile's `choices` and the flags `req` gives explicitly.

    Files that already hold a quantized format run as stored (no re-quantizing); on the CPU nothing is
    quantized unless asked. The bundled tiny tasks are not planned (a 20 MB model fits anywhere): only the
    profile's choices and the flags apply."""
    plan = None
    if not req.task.startswith("tiny-"):
        free_format = not stored_quantized and req.quant in ("auto", *QUANT_FLAGS)
        plan = apply_profile(make_plan(work, hw, req.quant if req.quant in QUANT_FLAGS else "auto"), choices)
        # on the CPU weights stay as stored unless a profile (a replayed job) names the format
        planned_quant = plan.quant if free_format and (plan.device == "cuda" or "quant" in choices) else "auto"
    else:
        planned_quant = choices.get("quant", "auto")
    given = lambda key, default: getattr(plan, key) if plan is not None else choices.get(key, default)  # noqa: E731
    return Placement(
        plan,
        req.quant if req.quant != "auto" else planned_quant,
        req.offload if req.offload != "auto" else given("offload", "auto"),
        req.resident_blocks if req.resident_blocks is not None else given("resident_blocks", 0),
        req.prefetch if req.prefetch is not None else max(1, given("prefetch", 1)),
        req.ram_mode if req.ram_mode is not None else given("ram_mode", "pinned"),
        (req.chunk_tokens if req.chunk_tokens is not None else given("chunk_tokens", 0)) or None,
        req.vae_tile if req.vae_tile is not None else (
            given("vae_tile", 0) if "vae_tile" in choices or (plan is not None and plan.device == "cuda") else None),
        req.t5_cpu or (given("t5_device", "") == "cpu" and not req.t5_fsdp),  # sharded: on the GPUs
        req.cfg if req.cfg != "auto" else given("cfg", "batched"),
        plan.t5_quant if plan is not None else "",
        plan.extender_device if plan is not None else "", plan.extender_quant if plan is not None else "")
