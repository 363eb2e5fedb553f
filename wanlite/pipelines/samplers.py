"""Flow-matching samplers, k-diffusion style: `sample_<name>(denoiser, x, sigmas, callback)`.

The flow convention of Wan: x_t = (1 - sigma) x0 + sigma * noise, alpha = 1 - sigma, lambda = log(alpha / sigma).
The denoiser returns the x0 prediction; samplers know nothing about experts, guidance or caching.
After each step the callback gets the sampler's `carry`: every value the next step reads (the sample and the
multistep history), so `sampler(..., resume=carry)` continues as if it had never stopped (wanlite.pipelines.resume).
Grids and integer timesteps follow the official `wan/utils/fm_solvers_unipc.py` and `fm_solvers.py`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): more steps at high noise for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _unipc_sigma_max() -> float:
    # the official scheduler's table: sigmas = 1 - linspace(1, 1/1000, 1000)[::-1], stored as float32
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]
    return float(np.float32(1.0 - alphas[0]))


def _shifted_grid(solver: str, steps: int, shift: float) -> np.ndarray:
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    start = _unipc_sigma_max() if solver == "unipc" else 1.0  # UniPC starts at 0.999, DPM++ at 1.0
    return shift_sigmas(np.linspace(start, 0.0, steps + 1)[:-1], shift)  # float64, as the official numpy code


def make_sigmas(solver: str, steps: int, shift: float) -> torch.Tensor:
    """The solver's sigma grid: `steps` shifted sigmas then a final 0, float32 like the official schedulers."""
    grid = _shifted_grid(solver, steps, shift)
    return torch.from_numpy(np.append(grid, 0.0).astype(np.float32))


def model_timesteps(solver: str, steps: int, shift: float) -> torch.Tensor:
    """The timesteps the DiT sees: int64(sigma * 1000) of the float64 grid for UniPC / DPM++ (official
    `timesteps`); Euler keeps them fractional (sigma * 1000, as the Lightning distillation's Euler sampler:
    1000, 937.5, 833.3, 625 for its 4 steps)."""
    grid = _shifted_grid(solver, steps, shift) * NUM_TRAIN_TIMESTEPS
    return torch.from_numpy(grid if solver == "euler" else grid.astype(np.int64))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _report(callback, i, sigmas, x, denoised, carry: dict):
    if callback is not None:
        callback({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised,
                  "carry": {"next": i + 1, "x": x, **carry}})


def _resumed(resume: dict | None, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(first step, sample) of a run: from the start, or from a carry (its tensors moved to x's device)."""
    if resume is None:
        return 0, x.float()
    return int(resume["next"]), resume["x"].to(x.device)


def _on(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.device)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None,
                 resume: dict | None = None) -> torch.Tensor:
    """Euler on the flow ODE: x += (sigma_next - sigma) * v, with v = (x - x0) / sigma."""
    start, x = _resumed(resume, x)
    for i in range(start, len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, s, i).float()
        x = x + (s_next - s) * (x - x0) / s
        _report(callback, i, sigmas, x, x0, {})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None,
                    resume: dict | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, midpoint form; first order on the first and the final step
    (Lu et al. 2022; official `FlowDPMSolverMultistepScheduler`, final sigma zero)."""
    start, x = _resumed(resume, x)
    steps = len(sigmas) - 1
    prev_x0 = None if resume is None else _on(resume["prev_x0"], x)
    for i in range(start, steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, s, i).float()
        if s_next == 0:
            x = x0  # the first-order update with sigma_next = 0 lands exactly on x0
        else:
            h = _lambda(s_next) - _lambda(s)
            d = x0
            if prev_x0 is not None and i < steps - 1:
                r = (_lambda(s) - _lambda(sigmas[i - 1])) / h
                d = x0 + 0.5 * (x0 - prev_x0) / r
            x = (s_next / s) * x - (1 - s_next) * torch.expm1(-h) * d
        prev_x0 = x0
        _report(callback, i, sigmas, x, x0, {"prev_x0": prev_x0})
    return x


def _unipc_coefficients(h: torch.Tensor, rks: list[torch.Tensor], order: int):
    """B(h) = expm1(-h) ("bh2") and the right-hand side b of UniPC's order conditions."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(torch.stack([r ** (k - 1) for r in rks]))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(rhs)


def _unipc_update(x, history, sigma_hist, s_to, order, x0_new=None):
    """One UniPC step from sigma_hist[-1] to s_to using the x0 history (predictor), or, given x0_new at
    s_to, the UniC correction of a predicted sample (Zhao et al. 2023, data prediction, bh2)."""
    s0 = sigma_hist[-1]
    m0 = history[-1]
    lam_t, lam_s0 = _lambda(s_to), _lambda(s0)
    h = lam_t - lam_s0
    rks, diffs = [], []
    for k in range(1, order):
        rk = (_lambda(sigma_hist[-1 - k]) - lam_s0) / h
        rks.append(rk)
        diffs.append((history[-1 - k] - m0) / rk)
    rks.append(torch.ones_like(h))
    h_phi_1, b_h, rows, rhs = _unipc_coefficients(h, rks, order)
    alpha_t = 1 - s_to
    x_t = (s_to / s0) * x - alpha_t * h_phi_1 * m0
    if x0_new is None:  # predictor
        if diffs:
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(rows[:-1, :-1], rhs[:-1])
            x_t = x_t - alpha_t * b_h * sum(r * d for r, d in zip(rhos, diffs))
        return x_t
    rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, rhs)
    correction = sum((r * d for r, d in zip(rhos[:-1], diffs)), torch.zeros_like(x))
    return x_t - alpha_t * b_h * (correction + rhos[-1] * (x0_new - m0))


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None,
                 order: int = 2, resume: dict | None = None) -> torch.Tensor:
    """UniPC multistep (bh2) with the UniC corrector, order warm-up and lower order on the final steps
    (Zhao et al. 2023; official `FlowUniPCMultistepScheduler`: solver_order 2, predict_x0, lower_order_final)."""
    start, x = _resumed(resume, x)
    steps = len(sigmas) - 1
    history: list[torch.Tensor] = []
    sigma_hist: list[torch.Tensor] = []  # the sigmas of `history`: host tensors, as `sigmas`
    last_x, last_order = None, 0
    if resume is not None:
        history = [_on(h, x) for h in resume["history"]]
        sigma_hist = [sigmas[j] for j in resume["history_steps"]]
        last_x, last_order = _on(resume["last_x"], x), int(resume["last_order"])
    for i in range(start, steps):
        x0 = denoiser(x, sigmas[i], i).float()
        if last_x is not None:  # correct the previous prediction with the model output at its end point
            x = _unipc_update(last_x, history, sigma_hist, sigmas[i], last_order, x0_new=x0)
        history = (history + [x0])[-order:]
        sigma_hist = (sigma_hist + [sigmas[i]])[-order:]
        this_order = min(order, steps - i, len(history))
        last_x, last_order = x, this_order
        x = _unipc_update(x, history, sigma_hist, sigmas[i + 1], this_order)
        _report(callback, i, sigmas, x, x0, {"history": history, "history_steps": list(range(i + 1 - len(history),
                 i + 1)), "last_x": last_x, "last_order": last_order})
    return x


SAMPLERS = {"unipc": sample_unipc, "dpm++": sample_dpmpp_2m, "euler": sample_euler}
