"""Apply mapped LoRAs to a DiT as it loads: merged into weights before they are quantized, or as a runtime
low-rank branch on layers whose stored format cannot take a merge.

Merge (`merge_into`): the loader hands every Linear weight to `LoraSet.merged` on its way from the file to the
module, so `W + sum(scale * up @ down)` (fp32) is what gets quantized — merge-then-quantize, no extra pass.
Runtime (`attach`): each remaining targeted Linear (fp8/GGUF `QLinear` stored pre-quantized, torchao/quanto int8,
or everything with mode "runtime") gets two buffers, `lora_down` [R, in] and `lora_up` [out, R] — every LoRA on
that layer stacked along the rank, its scale folded into its up rows — and a forward hook adding
`(x @ down.T) @ up.T`: never a full-size delta per forward, and the buffers travel with their block when it is
offloaded. Full-weight deltas (`.diff`, `.diff_b`, `.diff_m`: norms, biases, modulation) are added in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wanlite.lora.keys import LoraFile

MODES = ("auto", "merge", "runtime")


def lora_branch_hook(lora: "LoraSet", module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    if lora.gain == 0.0:
        return output
    x = args[0]
    branch = F.linear(F.linear(x, module.lora_down.to(x.dtype)), module.lora_up.to(x.dtype))
    return output + (branch if lora.gain == 1.0 else lora.gain * branch).to(output.dtype)


@dataclass
class LoraSet:
    """The LoRAs of one expert with their strengths, and what has been merged so far."""

    loras: list[tuple[LoraFile, float]]
    mode: str = "auto"  # auto: merge where weights arrive dense, branch elsewhere; merge | runtime: force one
    merged_names: set[str] = field(default_factory=set)
    delta_names: set[str] = field(default_factory=set)
    gain: float = 1.0  # multiplies every runtime branch (a preset phase can switch the LoRAs off)
    # offload that re-reads pieces binds them into fixed shells: the embeddings and head (dense, never streamed)
    # take their LoRAs merged so those shells keep their layout
    merge_outside_blocks: bool = False
    counts: dict = field(default_factory=lambda: {"merged": 0, "runtime": 0, "deltas": 0})

    def targets(self) -> set[str]:
        return {name for lora, _ in self.loras for name in lora.low_rank}

    def merged(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (dense, as the loader holds it) plus every LoRA's update for `module_name`."""
        if self.mode == "runtime" and (module_name.startswith("blocks.") or not self.merge_outside_blocks):
            return weight
        pairs = [(lora.low_rank[module_name], s) for lora, s in self.loras if module_name in lora.low_rank]
        if not pairs:
            return weight
        with torch.no_grad():
            total = weight.float()
            for pair, strength in pairs:
                total = total + (pair.up.float() * (strength * pair.scale)) @ pair.down.float()
        if module_name not in self.merged_names:  # a piece read again (offload) merges again, counted once
            self.merged_names.add(module_name)
            self.counts["merged"] += 1
        return total.to(weight.dtype)

    def attach(self, model: nn.Module, prefix: str = "") -> None:
        """After loading `model` (a whole DiT, or the piece whose names start with `prefix`): runtime branches for
        the targeted layers not merged, and the full-weight deltas."""
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        stacks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for lora, strength in self.loras:
                for name, pair in lora.low_rank.items():
                    local = _local(name, prefix)
                    if local is None or local not in modules or name in self.merged_names:
                        continue
                    stacks.setdefault(local, []).append((pair.down.float(),
                                                         pair.up.float() * (strength * pair.scale)))
                for name, delta in lora.deltas.items():
                    local = _local(name, prefix)
                    if local is not None and local in params:
                        p = params[local]
                        p.copy_((p.float() + strength * delta.float()).to(p.dtype))
                        if name not in self.delta_names:  # a piece read again (offload) is counted once
                            self.delta_names.add(name)
                            self.counts["deltas"] += 1
            for local, pairs in stacks.items():
                module = modules[local]
                dtype = _compute_dtype(module)
                module.register_buffer("lora_down", torch.cat([d for d, _ in pairs]).to(dtype))
                module.register_buffer("lora_up", torch.cat([u for _, u in pairs], dim=1).to(dtype))
                module.register_forward_hook(functools.partial(lora_branch_hook, self))
                self.counts["runtime"] += 1


def _local(name: str, prefix: str) -> str | None:
    if not prefix:
        return name
    return name[len(prefix):] if name.startswith(prefix) else None


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's output comes in: its bias's, else a dense weight's, else bf16."""
    for t in (getattr(module, "bias", None), getattr(module, "weight", None)):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return t.dtype
    return torch.bfloat16
