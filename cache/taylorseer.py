"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting"): full computes on a fixed interval, the steps in
between forecast the span's residual by a Taylor series in the step index. The schedule is known ahead."""
from __future__ import annotations

from wanlite.cache.base import BranchState, CachePolicy, StepInfo, register_cache
from wanlite.cache.config import TaylorSeerConfig


@register_cache(TaylorSeerConfig)
class TaylorSeerPolicy(CachePolicy):
    def __init__(self, config: TaylorSeerConfig):
        super().__init__(config)
        self.order = config.order

    def forced(self, state: BranchState, info: StepInfo) -> bool:
        c = self.config
        return info.index < c.warmup_steps or (info.index - c.warmup_steps) % c.interval == 0
