"""The speech-to-video parts of the DiT (official `wan/modules/s2v/`): audio encoder, audio injectors, pose
encoder, FramePack motion history and their RoPE positions. `WanDiT` builds them when its spec has `s2v`;
the injectors live inside the blocks they follow, so offload and step caching move them with their block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wanlite.models.blocks import WanCrossAttention, layer_norm_fp32, linear_fp32
from wanlite.specs import S2VSpec

# RoPE time position of the reference image's tokens (after the clip's frames, official fixed 30)
REF_TIME_POSITION = 30


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: left-padded by kernel-1 copies of the first column."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the weights' dtype (the reference's autocast-fp32 island; these weights are small)
        conv = self.conv
        return F.conv1d(F.pad(x.float(), (self.pad, 0), mode="replicate"), conv.weight.float(),
                        None if conv.bias is None else conv.bias.float(), stride=conv.stride)


def channel_norm_silu(x: torch.Tensor) -> torch.Tensor:
    """[N, C, T]: LayerNorm over the channels (no affine, eps 1e-6), then SiLU (the causal token encoders' step)."""
    return F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)


class AudioTokenEncoder(nn.Module):
    """Per-frame audio features [B, C, T] -> local tokens [B, T', n+1, d] (n streams + a learned padding token)
    and one global vector [B, T', 1, d]; T' = T downsampled 4x by two stride-2 causal convolutions."""

    def __init__(self, in_dim: int, dim: int, streams: int):
        super().__init__()
        self.streams = streams
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * streams)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(channel_norm_silu(x))
        return channel_norm_silu(self.conv3(channel_norm_silu(x))).transpose(1, 2)  # [N, T', d]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, t = features.shape
        local = self.conv1_local(features).view(b * self.streams, -1, t)  # stream k = channel block k
        local = self._shared(local).unflatten(0, (b, self.streams)).transpose(1, 2)  # [B, T', n, d]
        local = torch.cat([local, self.padding_tokens.float().expand(b, local.shape[1], 1, -1)], dim=2)
        global_ = linear_fp32(self.final_linear, self._shared(self.conv1_global(features)))
        return local, global_.unsqueeze(2)


class CausalAudioEncoder(nn.Module):
    """wav2vec2 hidden states [B, layers, C, T] (T = video frames) -> a learned SiLU-weighted average over the
    layers -> `AudioTokenEncoder`. Computed in fp32 (the reference's autocast island)."""

    def __init__(self, spec: S2VSpec, dim: int):
        super().__init__()
        self.encoder = AudioTokenEncoder(spec.audio_dim, dim, spec.audio_tokens)
        self.weights = nn.Parameter(torch.full((1, spec.audio_layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = F.silu(self.weights.float())
        return self.encoder((features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1))


@dataclass
class AudioTokens:
    """What the audio injectors read: per latent frame, local tokens [B, F, n+1, d] and the AdaIN vector
    [B, F, d]; they act on the first `noisy_tokens` tokens of the sequence (the frames being denoised)."""

    local: torch.Tensor
    global_: torch.Tensor
    noisy_tokens: int

    def rows(self, index: torch.Tensor) -> "AudioTokens":
        return AudioTokens(self.local[index], self.global_[index], self.noisy_tokens)


class AudioInjector(nn.Module):
    """After its block: AdaIN of each frame's noisy tokens by that frame's global audio vector (shift, scale
    from a linear of SiLU), then cross-attention to the frame's audio tokens, added without a gate."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.attn = WanCrossAttention(dim, num_heads, eps)
        self.adain = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, audio: AudioTokens, frames_per_chunk: int | None = None) -> torch.Tensor:
        """x [B, L, d] -> x with the audio residual added to its first `audio.noisy_tokens` tokens (in place)."""
        b, _, d = x.shape
        frames = audio.local.shape[1]
        per_frame = audio.noisy_tokens // frames
        mod = linear_fp32(self.adain, F.silu(audio.global_.float()))  # [B, F, 2d]
        shift, scale = mod.unsqueeze(2).chunk(2, dim=-1)
        step = frames_per_chunk or frames
        for f0 in range(0, frames, step):
            f1 = min(f0 + step, frames)
            tokens = x[:, f0 * per_frame:f1 * per_frame]
            h = layer_norm_fp32(tokens.unflatten(1, (f1 - f0, per_frame)), 1e-5)
            h = (h * (1 + scale[:, f0:f1]) + shift[:, f0:f1]).to(x.dtype).flatten(0, 1)  # [(B F), hw, d]
            y = self.attn(h, audio.local[:, f0:f1].to(x.dtype).flatten(0, 1)).view(b, -1, d)
            tokens.copy_((tokens.float() + y.float()).to(x.dtype))
        return x


class FramePacker(nn.Module):
    """FramePack motion history: the newest `pack_buckets` latents (1, 2, 16) patchified at 1x, 2x and 4x
    coarser resolution, so 19 latents of history cost ~1.5 frames of tokens."""

    def __init__(self, spec: S2VSpec, dim: int):
        super().__init__()
        self.buckets = spec.pack_buckets
        c = spec.cond_dim
        self.proj = nn.Conv3d(c, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """motion latents [B, C, T, h, w] (oldest first) -> tokens [B, N, d] and positions [N, 3] (t, h, w)."""
        b, c, t, h, w = motion.shape
        newest, mid, oldest = self.buckets
        total = newest + mid + oldest
        packed = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t)
        if keep:
            packed[:, :, total - keep:] = motion[:, :, t - keep:]
        far, near, last = packed.split([oldest, mid, newest], dim=2)
        tokens = [conv(part.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
                  for conv, part in ((self.proj, last), (self.proj_2x, near), (self.proj_4x, far))]
        positions = torch.cat([
            _motion_positions(h, w, -newest, newest, 1, 2),
            _motion_positions(h, w, -(newest + mid), mid, 2, 4),
            _motion_positions(h, w, -total, oldest, 4, 8)])
        return torch.cat(tokens, dim=1), positions


def _spread(count: int, extent: int) -> torch.Tensor:
    """`count` integer positions spread over 0..extent-1, truncated like the reference's np.linspace."""
    return torch.from_numpy(np.linspace(0, extent - 1, count).astype(np.int64))


def _motion_positions(h: int, w: int, start: int, frames: int, t_stride: int, s_stride: int) -> torch.Tensor:
    """(t, h, w) RoPE positions of one FramePack group: its compressed frames at negative times (oldest at
    `start`), its coarse tokens spread over the full-resolution token grid (h/2 x w/2)."""
    times = -torch.from_numpy(np.linspace(-start, -start - frames + 1, frames // t_stride).astype(np.int64))
    hs, ws = _spread(h // s_stride, h // 2), _spread(w // s_stride, w // 2)
    grid = torch.stack(torch.meshgrid(times, hs, ws, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def grid_positions(frames: int, h: int, w: int, t0: int = 0) -> torch.Tensor:
    """(t, h, w) positions [F*h*w, 3] of a token grid in (f, h, w) order, times starting at t0."""
    grid = torch.stack(torch.meshgrid(torch.arange(t0, t0 + frames), torch.arange(h), torch.arange(w),
                                      indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


@dataclass
class S2VConditions:
    """One S2V clip's conditioning for a DiT forward (batch rows = CFG branches).

    ref_latents [B, 16, 1, h, w]: the reference image; motion_latents [B, 16, 19, h, w] or None (no history
    tokens: the first clip); pose_latents [B, 16, F, h, w] or None (no pose: only the pose encoder's bias);
    audio [B, layers, C, F]: wav2vec2 features at the clip's video frames (zeros for the unconditional row)."""

    ref_latents: torch.Tensor
    audio: torch.Tensor
    motion_latents: torch.Tensor | None = None
    pose_latents: torch.Tensor | None = None

    def rows(self, index) -> "S2VConditions":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return S2VConditions(self.ref_latents[index], self.audio[index], pick(self.motion_latents),
                             pick(self.pose_latents))
