"""MagCache (Ma et al. 2025): residual magnitudes shrink by a per-step ratio that is nearly model-constant, so a
ratio curve calibrated once says, before sampling starts, which steps can reuse the last residual.

Calibration (`CalibrateConfig`, `wanlite generate --cache calibrate`) computes every step and records, per expert
and CFG branch, gamma_t = mean over tokens of |R_t| / |R_{t-1}| (L2 over channels) of the span residual R.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from wanlite.cache.base import BranchState, CachePolicy, StepInfo, register_cache
from wanlite.cache.config import CalibrateConfig, MagCacheConfig
from wanlite.errors import WanliteError

BUNDLED = Path(__file__).parent / "curves"  # the bundled tiny models' calibrations


def read_curve(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        curves = {key: [float(g) for g in values] for key, values in data["curves"].items()}
        return {"steps": int(data["steps"]), "curves": curves, "task": data.get("task")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WanliteError(f"MagCache calibration {path} is unreadable ({exc}); recalibrate with --cache calibrate")


def write_curve(path: Path, task: str, steps: int, curves: dict[str, list[float]]) -> Path:
    """Write atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"task": task, "steps": steps, "curves": curves}, f, indent=1)
    os.replace(tmp, path)
    return path


@register_cache(MagCacheConfig)
class MagCachePolicy(CachePolicy):
    def __init__(self, config: MagCacheConfig):
        super().__init__(config)
        if config.curve is None:
            raise WanliteError("MagCache needs a calibration curve: run once with --cache calibrate")
        calibration = read_curve(config.curve)
        self.calibrated_steps, self.curves = calibration["steps"], calibration["curves"]

    def gamma(self, info: StepInfo) -> float:
        """The calibrated ratio at this step, nearest-interpolated when the step count differs."""
        curve = self.curves.get(f"{info.role}/{info.branch}")
        if curve is None:
            raise WanliteError(f"the MagCache calibration has no curve for {info.role}/{info.branch}; "
                               "recalibrate with --cache calibrate for this task")
        n = info.total_steps or self.calibrated_steps
        i = round(info.step * (self.calibrated_steps - 1) / max(n - 1, 1))
        return curve[min(i, len(curve) - 1)]

    def _retained(self, info: StepInfo) -> bool:
        return info.expert_steps is not None and info.index < self.config.retention * info.expert_steps

    def _advance(self, state: BranchState, info: StepInfo) -> tuple[float, float, int]:
        ratio = state.counters.get("ratio", 1.0) * self.gamma(info)
        err = state.counters.get("err", 0.0) + abs(1 - ratio)
        return ratio, err, state.counters.get("skipped", 0) + 1

    def forced(self, state: BranchState, info: StepInfo) -> bool:
        if self._retained(info) or info.index == 0:
            return True
        _, err, run = self._advance(state, info)
        return not (err < self.config.threshold and run <= self.config.max_skip_steps)

    def commit(self, state: BranchState, info: StepInfo, computed: bool) -> None:
        super().commit(state, info, computed)
        if self._retained(info) or info.index == 0:
            return
        if computed:
            state.counters.update(ratio=1.0, err=0.0, skipped=0)
        else:
            ratio, err, run = self._advance(state, info)
            state.counters.update(ratio=ratio, err=err, skipped=run)


@register_cache(CalibrateConfig)
class CalibratePolicy(CachePolicy):
    """Computes every step; `curves` collects gamma per (expert/branch) and global step."""

    def __init__(self, config: CalibrateConfig):
        super().__init__(config)
        self.curves: dict[str, dict[int, float]] = {}

    def forced(self, state: BranchState, info: StepInfo) -> bool:
        return True

    def commit(self, state: BranchState, info: StepInfo, computed: bool) -> None:
        current = state.terms[0].float()  # [L, d]
        previous = state.counters.get("previous")
        gamma = 1.0
        if previous is not None:
            gamma = float((current.norm(dim=-1) / previous.norm(dim=-1).clamp_min(1e-8)).mean())
        state.counters["previous"] = current
        self.curves.setdefault(f"{info.role}/{info.branch}", {})[info.step] = gamma

    def state_dict(self) -> dict:
        return {key: dict(by_step) for key, by_step in self.curves.items()}

    def load_state_dict(self, state: dict) -> None:
        self.curves = {key: {int(step): float(g) for step, g in by_step.items()} for key, by_step in state.items()}

    def finished(self, steps: int) -> dict[str, list[float]]:
        """Per key, one ratio per step of the run (1.0 where the key did not run)."""
        return {key: [round(by_step.get(s, 1.0), 6) for s in range(steps)] for key, by_step in self.curves.items()}


def calibration_path(cache_dir: Path, task: str, model_id: str) -> Path:
    return cache_dir / "magcache" / f"{task}-{model_id}.json"
