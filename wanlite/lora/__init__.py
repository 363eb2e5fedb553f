"""LoRAs on Wan DiTs (`--lora FILE[:STRENGTH]`, per expert `--lora_high` / `--lora_low`), on every weight format.

    sets = lora_sets(["style.safetensors:0.8"], [], [], components, "t2v-A14B")   # role -> LoraSet
    model = load_dit(component, task, lora=sets["high_noise"])                       # merged / branched as it loads

Key formats and application: `wanlite.lora.keys`, `wanlite.lora.apply`. Presets (`--preset lightning`) live in
`PRESETS`: the step-distillation recipe the LoRA was trained for.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from wanlite.errors import WanliteError
from wanlite.lora.apply import MODES, LoraSet
from wanlite.lora.keys import LoraFile, LowRank, expert_half, map_lora, read_tensors

__all__ = ["LoraSet", "LoraFile", "LowRank", "map_lora", "read_tensors", "parse_lora_arg", "lora_sets", "MODES",
           "PRESETS", "fingerprint", "lora_set"]

# Wan2.2-Lightning / lightx2v 4-step distillation (research/caching-lora.md 6.1): Euler on
# sigma = [1.0, 0.9375, 0.8333, 0.625] -> 0 at shift 5, guide 1 (no uncond pass), 2 high + 2 low-noise steps.
# The community's 3-phase variant against the distilled slow motion (Wan2GP's "Lightning 3 Phases", 6.2): 8 Euler
# steps at shift 3; while t >= 965 the high-noise expert runs with CFG 3.5 and without its LoRA, then with the
# LoRA at guide 1 until t < 800, where the low-noise expert takes over (LoRA, guide 1).
PRESETS = {
    "lightning": {"steps": 4, "shift": 5.0, "guide_scale": (1.0, 1.0), "solver": "euler"},
    "lightning-3phase": {"steps": 8, "shift": 3.0, "guide_scale": (1.0, 1.0), "solver": "euler", "boundary": 0.8,
                         "phases": ((965.0, 3.5, 0.0),)},
}


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' (a Windows drive letter is not a strength) -> (path, strength)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            strength = float(tail)
        except ValueError:
            if len(head) > 1:  # 'C:\\x.safetensors' splits as ('C', ...): that is a path, not a strength
                raise WanliteError(f"--lora {text}: the strength {tail!r} is not a number (FILE:0.8)") from None
        else:
            if not math.isfinite(strength):
                raise WanliteError(f"--lora {text}: the strength {tail!r} is not a finite number (FILE:0.8)")
            return Path(head), strength
    return Path(text), 1.0


def lora_sets(both: list[str], high: list[str], low: list[str], components: dict, task: str,
              mode: str = "auto", emit=lambda event: None) -> dict[str, LoraSet]:
    """Read and map every LoRA once per expert it applies to; `both` go to every expert (A14B: both), `high` /
    `low` to one. Raises WanliteError before any weight is loaded; unmatched keys become a warning."""
    if mode not in MODES:
        raise WanliteError(f"--lora_mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    roles = list(components)
    if (high or low) and not {"high_noise", "low_noise"} <= set(roles):
        raise WanliteError(f"--lora_high / --lora_low need a two-expert task (t2v-A14B, i2v-A14B); {task} has one "
                           "transformer: use --lora")
    wanted: dict[str, list[tuple[Path, float]]] = {role: [] for role in roles}
    for text in both:
        for role in roles:
            wanted[role].append(parse_lora_arg(text))
    for role, texts in (("high_noise", high), ("low_noise", low)):
        for text in texts:
            wanted[role].append(parse_lora_arg(text))
    files: dict[Path, dict] = {}
    return {role: lora_set(items, components[role], role, task, mode, emit, files)
            for role, items in wanted.items() if items}


def lora_set(items: list[tuple[Path, float]], component, role: str, task: str, mode: str,
             emit=lambda event: None, files: dict | None = None, merge_outside_blocks: bool = False) -> LoraSet:
    """One expert's LoRAs, (path, strength) each, read and mapped onto its transformer; `files` shares the
    tensors of a file read for another expert."""
    from wanlite.loading.models import prepare_dit

    files = {} if files is None else files
    model = prepare_dit(component, task).model
    mapped = []
    for path, strength in items:
        path = Path(path)
        tensors = expert_half(files.setdefault(path, read_tensors(path)), role, path)
        lora = map_lora(path, tensors, model)
        if lora.unmatched:
            emit({"event": "warning", "message": (
                f"{path.name}: {len(lora.unmatched)} keys match nothing in the {role} transformer and are "
                f"ignored (first: {', '.join(lora.unmatched[:3])})")})
        mapped.append((lora, strength))
    return LoraSet(mapped, mode, merge_outside_blocks=merge_outside_blocks)


def fingerprint(lora: LoraSet | None) -> str | None:
    """Identifies what a LoRA set does to the weights (files by name, size and time; strengths; mode), for the
    caches that hold merged weights."""
    if lora is None:
        return None
    parts = [lora.mode] + [f"{f.path.resolve()}:{f.path.stat().st_size}:{f.path.stat().st_mtime_ns}:{s}"
                           for f, s in lora.loras]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
