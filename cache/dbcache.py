"""DBCache (cache-dit, "Dual Block Cache"): front blocks decide, middle blocks are reused, back blocks refine."""
from __future__ import annotations

from wanlite.cache.base import BranchState, CachePolicy, StepInfo, register_cache
from wanlite.cache.config import DBCacheConfig


@register_cache(DBCacheConfig)
class DBCachePolicy(CachePolicy):
    needs_signal = True

    def __init__(self, config: DBCacheConfig):
        super().__init__(config)
        self.order = 0 if config.taylorseer is None else config.taylorseer.order

    def forced(self, state: BranchState, info: StepInfo) -> bool | None:
        c = self.config
        if info.index < c.warmup_steps or c.threshold <= 0:
            return True
        if 0 <= c.max_cached_steps <= state.cached or 0 <= c.max_consecutive_cached <= state.consecutive:
            return True
        return None  # known only once the front blocks ran

    def decide(self, state: BranchState, info: StepInfo, diff: float) -> bool:
        return diff >= self.config.threshold
