"""The one Denoiser every task uses: CFG batched in one forward, the MoE expert switch, TI2V's clean frame 0.

Samplers only ever call `denoiser(x, sigma, step) -> x0`; everything task-specific lives here, driven by the
TaskSpec, so a new task never needs a new loop. A step cache (wanlite.cache) learns here which step, expert and
CFG branch each batch row is.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wanlite.errors import NumericalOverflow
from wanlite.specs import TaskSpec


@dataclass
class Conditioning:
    """What the task's conditioners produced for one request."""

    context: list[torch.Tensor]  # [cond, uncond] text embeddings, each [L_i, text_dim]
    y: torch.Tensor | None = None  # I2V-A14B: [1, 20, F, h, w] mask + image latent, concatenated on channels
    first_frame: torch.Tensor | None = None  # TI2V with an image: clean latent of frame 0, [1, C, 1, h, w]
    s2v: object | None = None  # S2V: this clip's wanlite.models.s2v.S2VConditions, rows [cond, uncond]
    animate: object | None = None  # Animate: this segment's wanlite.models.animate.AnimateConditions, same rows


class Denoiser:
    """x0-prediction for the flow samplers: picks the expert by timestep, runs cond+uncond as one batch of 2
    (weights are streamed once per step), applies the expert's guide scale and returns x - sigma * v."""

    def __init__(self, task: TaskSpec, experts: Callable[[str], torch.nn.Module], cond: Conditioning,
                 timesteps: list[int], guide_scale: tuple[float, float],
                 on_expert: Callable[[str, int], None] | None = None, cache=None, boundary: float | None = None,
                 phases: tuple = (), on_lora_gain: Callable[[float], None] | None = None, dtype: str = ""):
        self.task = task
        self.dtype = dtype  # the job's compute dtype (fp16 | bf16 | fp32), named when the output is not finite
        self.timesteps = timesteps  # the integer model timesteps of the sampler's grid, one per step
        self.experts = experts  # role -> model; may load lazily (only one expert needs to be resident)
        self.cond = cond
        self.guide_scale = guide_scale
        self.on_expert = on_expert
        self.active: str | None = None
        self.boundary = task.boundary if boundary is None else boundary
        self.phases = sorted(phases, key=lambda p: -p[0])  # (t_from, guide, lora_gain)
        self.on_lora_gain = on_lora_gain
        self.lora_gain = 1.0
        self.cache = cache  # wanlite.cache.StepCache | None
        if cache is not None:
            cache.set_schedule(self.schedule())

    def expert_for(self, t: int) -> str:
        """Official rule: the high-noise expert while t >= boundary * 1000."""
        if self.boundary is None:
            return self.task.experts[0]
        return "high_noise" if t >= self.boundary * 1000 else "low_noise"

    def schedule(self) -> list[str]:
        """The expert of every step, known before sampling starts (so offload can prefetch the next one)."""
        return [self.expert_for(t) for t in self.timesteps]

    def guide_for(self, role: str, t: float | None = None) -> float:
        phase = self.phase_for(t)
        if phase is not None:
            return phase[1]
        low, high = self.guide_scale
        return high if role == "high_noise" else low

    def phase_for(self, t: float | None):
        return next((p for p in self.phases if t is not None and t >= p[0]), None)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        t = self.timesteps[step]
        role = self.expert_for(t)
        if role != self.active:
            self.active = role
            if self.on_expert is not None:
                self.on_expert(role, step)
        model = self.experts(role)
        phase = self.phase_for(t)
        gain = 1.0 if phase is None else phase[2]
        if gain != self.lora_gain and self.on_lora_gain is not None:
            self.on_lora_gain(gain)
        self.lora_gain = gain
        guide = self.guide_for(role, t)
        cfg = abs(guide - 1.0) > 1e-6  # official `use_cfg`: guide 1 (distilled) runs the cond pass alone
        passes = 2 if cfg else 1
        b, _, frames = x.shape[:3]
        if self.cond.first_frame is not None:
            x = torch.cat([self.cond.first_frame.to(x.dtype), x[:, :, 1:]], dim=2)
            timestep = torch.full((passes * b, frames), float(t), device=x.device)
            timestep[:, 0] = 0.0  # frame 0 is clean: its tokens see timestep 0
        else:
            timestep = torch.full((passes * b,), float(t), device=x.device)
        y = None if self.cond.y is None else self.cond.y.repeat(passes * b // self.cond.y.shape[0], 1, 1, 1, 1)
        context = [c.to(x.device) for c in self.cond.context[:1] * b + self.cond.context[1:passes] * b]
        if self.cache is not None:
            self.cache.begin(step, role, ("cond",) * b + ("uncond",) * b * (passes - 1))
        extra = {name: getattr(self.cond, name).rows(slice(0, passes)) for name in ("s2v", "animate")
                 if getattr(self.cond, name) is not None}
        out = model(torch.cat([x, x]) if cfg else x, timestep, context, y=y, **extra).float()
        if cfg:
            v_cond, v_uncond = out.chunk(2)
            v = v_uncond + guide * (v_cond - v_uncond)
        else:
            v = out
        # a NaN / inf video must never be written: stop at the step. One sync, on the guided result: a NaN / inf
        # in the transformer's output always carries into it, and a huge guide scale can overflow here alone
        if not torch.isfinite(v).all():
            raise self._not_finite(role, step, guide, bool(torch.isfinite(out).all()))
        x0 = x.float() - float(sigma) * v
        if self.cond.first_frame is not None:
            x0[:, :, :1] = self.cond.first_frame.float()
        return x0

    def _not_finite(self, role: str, step: int, guide: float, model_finite: bool) -> NumericalOverflow:
        """The error naming the likely cause: the guidance, fp16's range, or (in bf16 / fp32) the inputs."""
        at = f"at step {step + 1}"
        if model_finite:
            return NumericalOverflow(f"classifier-free guidance {at} gave non-finite values: guide scale {guide:g} "
                                     "times the difference of the two predictions overflows; use a smaller "
                                     "--sample_guide_scale (the official ones are 3 to 5)")
        output = f"the {role.replace('_', '-')} transformer's output"
        if self.dtype == "fp16":
            return NumericalOverflow(f"{output} is not finite {at} (an overflow: fp16 ends at 65504); rerun with "
                                     "--dtype bf16 (RTX 30xx or newer) or --dtype fp32")
        computed = f" (computed in {self.dtype})" if self.dtype else ""
        return NumericalOverflow(f"{output} has non-finite values (NaN / Inf) {at}{computed}; check what goes into "
                                 "it: a LoRA (its weights, alpha or strength), a large --sample_guide_scale, the "
                                 "checkpoint (`wanlite check`)")
