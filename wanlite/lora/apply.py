"""Apply mapped LoRAs to a DiT as it loads: merged into weights before they are quantized, or as a runtime
low-rank branch on layers whose stored format cannot take a merge.

Merge (`merge_into`): the loader hands every Linear weight to `LoraSet.merged` on its way from the file to the
module, so `W + sum(scale * up @ down)` (fp32) is what gets quantized — merge-then-quantize, no extra pass.
Runtime (`attach`): each remaining targeted Linear (fp8/GGUF `QLinear` stored pre-quantized, torchao/quanto int8,
or everything with mode "runtime") gets two buffers, `lora_down` [R, in] and `lora_up` [out, R] — every LoRA on
that layer stacked along the rank, its scale folded into its up rows — and a forward hook adding
`(x @ down.T) @ up.T`: never a full-size delta per forward, and the buffers travel with their block when it is
offloaded. A LoKr adds `w1 X w2^T` (X: x viewed as [.., b1, b2]) from its own buffers, so its Kronecker product
is never formed either. Full-weight deltas (`.diff`, `.diff_b`, `.diff_m`: norms, biases, modulation) are added
in place. The fp32 layers (embeddings, head) run their hooks too (`models.blocks.linear_fp32`).
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
    branch = 0
    if hasattr(module, "lora_down"):
        branch = F.linear(F.linear(x, module.lora_down.to(x.dtype)), module.lora_up.to(x.dtype))
    for i in range(getattr(module, "lokr_count", 0)):
        branch = branch + kron_apply(x, *(getattr(module, f"lokr_{i}_{part}", None) for part in ("w1", "w2_a", "w2_b")))
    return output + (branch if lora.gain == 1.0 else lora.gain * branch).to(output.dtype)


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor | None) -> torch.Tensor:
    """x @ kron(w1, w2).T with w2 = w2_a @ w2_b (w2_b None: w2_a is w2), the scale folded into w1."""
    a1, b1 = w1.shape
    xs = x.reshape(*x.shape[:-1], b1, -1)  # [.., b1, b2]
    if w2_b is None:
        xs = xs @ w2_a.to(x.dtype).T
    else:
        xs = (xs @ w2_b.to(x.dtype).T) @ w2_a.to(x.dtype).T  # [.., b1, a2]
    return (w1.to(x.dtype) @ xs).reshape(*x.shape[:-1], -1)  # [.., a1, a2] -> out


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
        return {name for lora, _ in self.loras for name in (*lora.low_rank, *lora.kron)}

    def merged(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (dense, as the loader holds it) plus every LoRA's update for `module_name`."""
        if self.mode == "runtime" and (module_name.startswith("blocks.") or not self.merge_outside_blocks):
            return weight
        pairs = [(lora.low_rank[module_name], s) for lora, s in self.loras if module_name in lora.low_rank]
        krons = [(lora.kron[module_name], s) for lora, s in self.loras if module_name in lora.kron]
        if not pairs and not krons:
            return weight
        with torch.no_grad():
            total = weight.float()
            for pair, strength in pairs:
                total = total + (pair.up.float() * (strength * pair.scale)) @ pair.down.float()
            for kron, strength in krons:
                total = total + strength * kron.delta()
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
        krons: dict[str, list] = {}
        with torch.no_grad():
            for lora, strength in self.loras:
                for name, pair in lora.low_rank.items():
                    local = _local(name, prefix)
                    if local is None or local not in modules or name in self.merged_names:
                        continue
                    stacks.setdefault(local, []).append((pair.down.float(),
                                                         pair.up.float() * (strength * pair.scale)))
                for name, kron in lora.kron.items():
                    local = _local(name, prefix)
                    if local is not None and local in modules and name not in self.merged_names:
                        krons.setdefault(local, []).append((kron, strength))
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
            for local, updates in krons.items():
                module = modules[local]
                dtype = _compute_dtype(module)
                for i, (kron, strength) in enumerate(updates):
                    module.register_buffer(f"lokr_{i}_w1", (kron.w1.float() * (strength * kron.scale)).to(dtype))
                    module.register_buffer(f"lokr_{i}_w2_a", kron.w2_a.to(dtype))
                    if kron.w2_b is not None:
                        module.register_buffer(f"lokr_{i}_w2_b", kron.w2_b.to(dtype))
                module.lokr_count = len(updates)
            for local in {*stacks, *krons}:
                modules[local].register_forward_hook(functools.partial(lora_branch_hook, self))
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
