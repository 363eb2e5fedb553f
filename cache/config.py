"""Step-cache configurations: frozen, validated before any weight is loaded, printable in a plan."""
from __future__ import annotations

from dataclasses import dataclass

from wanlite.errors import WanliteError


@dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer (Liu et al. 2025): forecast a skipped span's residual from the last full computes by a Taylor
    series in the step index. Alone it refreshes every `interval` steps after `warmup_steps`; inside a
    DBCacheConfig only `order` matters (DBCache decides when to refresh)."""

    order: int = 1
    interval: int = 3
    warmup_steps: int = 2
    front_blocks: int = 0  # standalone: blocks always computed before / after the forecast span
    back_blocks: int = 0

    def check(self, num_blocks: int | None = None) -> None:
        if not 0 <= self.order <= 3:
            raise WanliteError(f"TaylorSeer order {self.order} is out of range: use 0 (plain reuse) to 3")
        if self.interval < 1 or self.warmup_steps < 0:
            raise WanliteError("TaylorSeer needs interval >= 1 and warmup_steps >= 0")
        _check_span(self.front_blocks, self.back_blocks, num_blocks)


@dataclass(frozen=True)
class DBCacheConfig:
    """DBCache (cache-dit): the first `front_blocks` and last `back_blocks` run every step; the middle blocks'
    residual is reused when the front blocks' residual moved less than `threshold` (relative L1) since the last
    computed step. Limits are per expert and CFG branch (-1: none)."""

    front_blocks: int = 1
    back_blocks: int = 0
    threshold: float = 0.08
    warmup_steps: int = 2
    max_cached_steps: int = -1
    max_consecutive_cached: int = -1
    taylorseer: TaylorSeerConfig | None = None

    def check(self, num_blocks: int | None = None) -> None:
        if self.front_blocks < 1:
            raise WanliteError("DBCache needs front_blocks >= 1: the front blocks' residual is what it compares")
        if self.threshold < 0:
            raise WanliteError(f"cache threshold {self.threshold} is negative: use a value >= 0 (0 never caches)")
        if self.warmup_steps < 0:
            raise WanliteError("DBCache warmup_steps must be >= 0")
        _check_span(self.front_blocks, self.back_blocks, num_blocks)
        if self.taylorseer is not None:
            self.taylorseer.check()


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache (Ma et al. 2025): skip the span while the accumulated error of a calibrated per-step
    residual-magnitude ratio stays under `threshold`, at most `max_skip_steps` in a row; the first `retention`
    fraction of each expert's steps always computes. The skip schedule is known before sampling starts."""

    threshold: float = 0.06
    max_skip_steps: int = 2
    retention: float = 0.2
    curve: str | None = None  # calibration JSON (`--cache calibrate` writes one); None: the model's default

    def check(self, num_blocks: int | None = None) -> None:
        if self.threshold < 0:
            raise WanliteError(f"cache threshold {self.threshold} is negative: use a value >= 0")
        if self.max_skip_steps < 0 or not 0 <= self.retention <= 1:
            raise WanliteError("MagCache needs max_skip_steps >= 0 and retention in [0, 1]")


@dataclass(frozen=True)
class CalibrateConfig:
    """Compute every step and record the residual-magnitude ratios a MagCacheConfig needs."""

    def check(self, num_blocks: int | None = None) -> None:
        pass


CacheConfig = DBCacheConfig | TaylorSeerConfig | MagCacheConfig | CalibrateConfig


def _check_span(front: int, back: int, num_blocks: int | None) -> None:
    if front < 0 or back < 0:
        raise WanliteError("front and back block counts must be >= 0")
    if num_blocks is not None and front + back >= num_blocks:
        raise WanliteError(f"front + back blocks ({front} + {back}) leave no middle block to cache in a "
                           f"{num_blocks}-block model; lower --cache_fn / --cache_bn")


def span(config: CacheConfig) -> tuple[int, int]:
    """(front, back): the blocks every step computes."""
    if isinstance(config, (DBCacheConfig, TaylorSeerConfig)):
        return config.front_blocks, config.back_blocks
    return 0, 0


def state_tensors(config: CacheConfig | None) -> int:
    """[tokens, dim] CFG-batch tensors a step cache adds to the forward's peak (the planner's cache memory): the
    span residual and its Taylor terms, plus one transient while they are refreshed; DBCache also keeps the front
    residual it compares against and the block input and differences it compares with. Checked against traced
    allocations in tests/test_planner.py."""
    if config is None:
        return 0
    if isinstance(config, DBCacheConfig):
        return 4 + (config.taylorseer.order if config.taylorseer else 0)
    if isinstance(config, TaylorSeerConfig):
        return 2 + config.order
    return 2 if isinstance(config, MagCacheConfig) else 4  # calibration: the previous residual in fp32


def describe(config: CacheConfig | None) -> dict | None:
    """The config as plain data for the plan, the metadata and the CLI summary."""
    if config is None:
        return None
    from dataclasses import asdict

    return {"policy": type(config).__name__.removesuffix("Config").lower(), **asdict(config)}


def from_description(data: dict | None) -> CacheConfig | None:
    """`describe`'s plain data back to the config (a video's recorded step cache, replayed)."""
    if data is None:
        return None
    fields = {k: v for k, v in data.items() if k != "policy"}
    if isinstance(fields.get("taylorseer"), dict):
        fields["taylorseer"] = TaylorSeerConfig(**fields["taylorseer"])
    return POLICY_CONFIGS[data["policy"]](**fields)


POLICY_CONFIGS = {type_.__name__.removesuffix("Config").lower(): type_
                  for type_ in (DBCacheConfig, TaylorSeerConfig, MagCacheConfig, CalibrateConfig)}
