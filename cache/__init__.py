"""Step caching (`wanlite.cache`): DBCache, TaylorSeer and MagCache behind one runner seam.

    cache = apply_cache(model, DBCacheConfig(front_blocks=1, threshold=0.08))
    ...sample...; cache.stats.to_dict(); cache.detach()

Presets (`--cache safe|fast|turbo`) are the configs picked from the sweep on the bundled tiny models recorded in
bench/results/cache.json (see README: their measured savings and quality).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from wanlite.cache.base import POLICIES, CachePolicy, StepCache, register_cache
from wanlite.cache.config import (CacheConfig, CalibrateConfig, DBCacheConfig, MagCacheConfig, TaylorSeerConfig,
                                  describe)
from wanlite.cache.dbcache import DBCachePolicy  # each policy module registers itself on import
from wanlite.cache.magcache import CalibratePolicy, MagCachePolicy
from wanlite.cache.taylorseer import TaylorSeerPolicy
from wanlite.errors import WanliteError

__all__ = ["apply_cache", "StepCache", "CacheConfig", "DBCacheConfig", "TaylorSeerConfig", "MagCacheConfig",
           "CalibrateConfig", "CachePolicy", "POLICIES", "register_cache", "PRESETS", "cache_config", "describe",
           "MIN_CACHED_STEPS", "DBCachePolicy", "TaylorSeerPolicy", "MagCachePolicy", "CalibratePolicy"]

# Chosen from the sweep on the bundled tiny models (bench/results/cache.json, README table): on them the fixed
# TaylorSeer schedules matched or beat DBCache at every saving, and their skip schedule is known before the step
# starts (offload moves nothing for a skipped step). 20 steps, fewer block evaluations at PSNR vs uncached:
# tiny-t2v safe 1.54x at 36.6 dB, fast 2.0x at 26.3 dB, turbo 2.2x at 23.4 dB; tiny-ti2v (image-to-video)
# 1.82x at 32.8 dB, 2.5x at 25.2 dB, 2.86x at 24.2 dB; every clip's direction kept. (MagCache does better on
# tiny-t2v but needs a calibration run per model.)
PRESETS: dict[str, CacheConfig] = {
    "safe": TaylorSeerConfig(order=1, interval=2, warmup_steps=2),
    "fast": TaylorSeerConfig(order=1, interval=3, warmup_steps=2),
    "turbo": TaylorSeerConfig(order=1, interval=4, warmup_steps=2),
}
POLICY_NAMES = ("dbcache", "taylorseer", "mag", "calibrate")
MIN_CACHED_STEPS = 9  # distilled schedules (<= 8 steps) are not cached unless forced: each step is too different


def apply_cache(model: torch.nn.Module, config: CacheConfig, role: str = "model") -> StepCache:
    """Put a step cache in front of `model`'s block loop (a plain loop or the offload engine).

    Args:
        model: a WanDiT (its `runner` is wrapped; weights and forward are unchanged).
        config: DBCacheConfig | TaylorSeerConfig | MagCacheConfig | CalibrateConfig.
        role: the expert's name (caches are kept per expert and CFG branch).

    Example:
        >>> cache = apply_cache(dit, DBCacheConfig(front_blocks=1, threshold=0.08))
        >>> cache.stats.to_dict()["block_evals_saved_x"]
    """
    cache = StepCache(config)
    cache.attach(model, role)
    return cache


def cache_config(name: "str | CacheConfig", threshold: float | None = None, front: int | None = None,
                 back: int | None = None,
                 order: int | None = None) -> CacheConfig | None:
    """`--cache NAME` (or a config object, from the Python API) plus the expert flags -> a validated config
    (None: off). Raises WanliteError."""
    tuned = {k: v for k, v in (("threshold", threshold), ("front_blocks", front), ("back_blocks", back),
                               ("order", order)) if v is not None}
    if not isinstance(name, str):
        if type(name) not in POLICIES:
            raise WanliteError(f"cache={name!r} is neither a cache name nor a cache config")
        config, name = name, type(name).__name__
    elif name == "off":
        if tuned:
            raise WanliteError(f"--cache off ignores {', '.join(tuned)}: pick a cache (--cache safe|fast|turbo|"
                               "dbcache|taylorseer|mag) or drop those flags")
        return None
    elif name in PRESETS:
        config = PRESETS[name]
    elif name == "dbcache":
        config = DBCacheConfig()
    elif name == "taylorseer":
        config = TaylorSeerConfig()
    elif name == "mag":
        config = MagCacheConfig()
    elif name == "calibrate":
        config = CalibrateConfig()
    else:
        raise WanliteError(f"--cache {name!r} is unknown; choose off, {', '.join(PRESETS)} or "
                           f"{', '.join(POLICY_NAMES)}")
    if "order" in tuned:
        order = tuned.pop("order")
        if isinstance(config, DBCacheConfig):
            config = replace(config, taylorseer=TaylorSeerConfig(order=order))
        elif isinstance(config, TaylorSeerConfig):
            config = replace(config, order=order)
        else:
            raise WanliteError("--taylorseer_order applies to --cache dbcache/taylorseer (or a preset built on them)")
    fields = set(getattr(config, "__dataclass_fields__", {}))
    wrong = [k for k in tuned if k not in fields]
    if wrong:
        raise WanliteError(f"{', '.join(wrong)} do not apply to --cache {name}")
    config = replace(config, **tuned)
    config.check()
    return config
