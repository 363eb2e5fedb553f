"""3D rotary position embedding, vectorized, fp32 cos/sin (official `wan/modules/model.py:rope_apply`)."""
from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary widths per axis (t, h, w): 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    # float64 like the official table, so cos/sin of large positions stay exact to fp32
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0):
    """cos, sin of shape [L, head_dim/2] for tokens of a (F, H, W) patch grid in (f, h, w) order."""
    f, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    at = _angles(torch.arange(f, device=device), dt, theta)  # [F, dt/2]
    ah = _angles(torch.arange(h, device=device), dh, theta)
    aw = _angles(torch.arange(w, device=device), dw, theta)
    angles = torch.cat([
        at[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)
    return angles.cos().float(), angles.sin().float()


def rope_cos_sin_at(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin [N, head_dim/2] for tokens at explicit (t, h, w) positions [N, 3] (negative times allowed: the
    S2V motion history sits before the clip)."""
    dims = axis_dims(head_dim)
    angles = torch.cat([_angles(positions[:, i], dims[i], theta) for i in range(3)], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x: [B, L, H, D] by the angles in cos/sin: [L, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    x1, x2 = pairs.unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
