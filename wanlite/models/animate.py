"""The character-animation parts of the DiT (official `wan/modules/animate/`): a face-motion network (LIA-style
StyleGAN2 encoder + orthogonal motion directions) that turns each 512x512 face crop into a motion vector, a
causal face-token encoder, the face adapters (per-frame attention to the face tokens, after every 5th block,
kept inside that block as S2V's audio injectors are), the CLIP image projection and the pose embedding.
`WanDiT` builds them when its spec has `animate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanlite.models.attention import attention
from wanlite.models.blocks import layer_norm_fp32
from wanlite.models.s2v import CausalConv1d, channel_norm_silu
from wanlite.specs import AnimateSpec

# LIA channel widths by feature-map side (the official EncoderApp's table)
_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
_BLUR = (1.0, 3.0, 3.0, 1.0)


class EqualConv2d(nn.Module):
    """StyleGAN2 equalized-learning-rate conv: weights stored unscaled, multiplied by 1/sqrt(fan_in) on use."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.stride, self.padding = 1 / math.sqrt(cin * kernel * kernel), stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2) (StyleGAN2's fused leaky ReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * math.sqrt(2)


class Blur(nn.Module):
    """Pad, then a normalised [1,3,3,1] x [1,3,3,1] low-pass per channel (before a stride-2 conv)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        k = torch.tensor(_BLUR)
        k = k[None, :] * k[:, None]
        self.register_buffer("kernel", k / k.sum())
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.pad
        c = x.shape[1]
        weight = self.kernel.flip(0, 1).to(x.dtype).expand(c, 1, *self.kernel.shape)
        return F.conv2d(F.pad(x, [p0, p1, p0, p1]), weight, groups=c)


def conv_layer(cin: int, cout: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """[Blur,] EqualConv2d[, BiasedLeakyReLU]: numbered like the official Sequential so the keys match."""
    layers: list[nn.Module] = []
    if downsample:
        p = len(_BLUR) - 2 + kernel - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
    layers.append(EqualConv2d(cin, cout, kernel, stride=2 if downsample else 1,
                              padding=0 if downsample else kernel // 2, bias=False))
    if activate:
        layers.append(BiasedLeakyReLU(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_layer(cin, cin, 3)
        self.conv2 = conv_layer(cin, cout, 3, downsample=True)
        self.skip = conv_layer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class AppearanceEncoder(nn.Module):
    """Face crop [N, 3, S, S] -> [N, style]: a 1x1 conv, ResBlocks halving the side down to 4, a 4x4 conv."""

    def __init__(self, size: int, style: int, width: int):
        super().__init__()
        channels = {side: min(c, width) for side, c in _CHANNELS.items()}
        self.convs = nn.ModuleList([conv_layer(3, channels[size], 1)])
        cin = channels[size]
        for i in range(int(math.log2(size)), 2, -1):
            self.convs.append(ResBlock(cin, channels[2 ** (i - 1)]))
            cin = channels[2 ** (i - 1)]
        self.convs.append(EqualConv2d(cin, style, 4, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)


class MotionCodes(nn.Module):
    def __init__(self, spec: AnimateSpec):
        super().__init__()
        self.net_app = AppearanceEncoder(spec.face_size, spec.motion_dim, spec.face_width)
        self.fc = nn.Sequential(*[EqualLinear(spec.motion_dim, spec.motion_dim) for _ in range(4)],
                                EqualLinear(spec.motion_dim, spec.motion_codes))


class MotionDirections(nn.Module):
    def __init__(self, spec: AnimateSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(spec.motion_dim, spec.motion_codes))


class MotionDecoder(nn.Module):
    def __init__(self, spec: AnimateSpec):
        super().__init__()
        self.direction = MotionDirections(spec)


class FaceMotionEncoder(nn.Module):
    """LIA face motion: the face crop's appearance code -> `motion_codes` coefficients -> a motion vector in
    the span of orthonormalised learned directions (QR of the direction matrix, in fp32)."""

    def __init__(self, spec: AnimateSpec):
        super().__init__()
        self.enc = MotionCodes(spec)
        self.dec = MotionDecoder(spec)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N, 3, S, S] in [-1, 1] -> [N, motion_dim] fp32."""
        codes = self.enc.fc(self.enc.net_app(faces))
        q, _ = torch.linalg.qr(self.dec.direction.weight.float() + 1e-8)
        return codes.float() @ q.T


class FaceTokenEncoder(nn.Module):
    """Per-frame motion vectors [B, T, C] -> [B, T', n+1, d]: n causal token streams downsampled 4x in time (two
    stride-2 convolutions), projected to the model width, plus a learned padding token."""

    def __init__(self, spec: AnimateSpec, dim: int):
        super().__init__()
        self.streams, hidden = spec.face_tokens, spec.face_hidden
        self.conv1_local = CausalConv1d(spec.motion_dim, hidden * spec.face_tokens)
        self.conv2 = CausalConv1d(hidden, hidden, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, stride=2)
        self.out_proj = nn.Linear(hidden, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        b, t, _ = motion.shape
        x = self.conv1_local(motion.transpose(1, 2)).view(b * self.streams, -1, t)
        x = channel_norm_silu(self.conv3(channel_norm_silu(self.conv2(channel_norm_silu(x)))))
        w, bias = self.out_proj.weight, self.out_proj.bias
        x = F.linear(x.transpose(1, 2), w.float(), None if bias is None else bias.float())  # [(B n), T', d]
        x = x.unflatten(0, (b, self.streams)).transpose(1, 2)
        return torch.cat([x, self.padding_tokens.float().expand(b, x.shape[1], 1, -1)], dim=2)


@dataclass
class FaceTokens:
    """What the face adapters read: [B, F, n+1, d] tokens, one group per latent frame of the sequence."""

    tokens: torch.Tensor

    def rows(self, index: torch.Tensor) -> "FaceTokens":
        return FaceTokens(self.tokens[index])


class HeadRMSNorm(nn.Module):
    """RMSNorm over one head's channels (the face adapter's q/k norm), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class FaceAdapter(nn.Module):
    """After its block: every latent frame's tokens attend (per head, q/k RMS-normed) to that frame's face
    tokens; the projected result is added without a gate."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.linear1_kv = nn.Linear(dim, 2 * dim)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = HeadRMSNorm(dim // num_heads)
        self.k_norm = HeadRMSNorm(dim // num_heads)

    def forward(self, x: torch.Tensor, face: FaceTokens, frames_per_chunk: int | None = None) -> torch.Tensor:
        b, length, d = x.shape
        frames = face.tokens.shape[1]
        per_frame = length // frames
        dtype = x.dtype
        kv = self.linear1_kv(layer_norm_fp32(face.tokens, 1e-6).to(dtype))  # [B, F, n, 2d]
        k, v = kv.unflatten(-1, (2, self.num_heads, -1)).unbind(-3)  # [B, F, n, H, D]
        k = self.k_norm(k)
        step = frames_per_chunk or frames
        out = torch.empty_like(x)
        for f0 in range(0, frames, step):
            f1 = min(f0 + step, frames)
            tokens = x[:, f0 * per_frame:f1 * per_frame]
            q = self.linear1_q(layer_norm_fp32(tokens, 1e-6).to(dtype)).unflatten(-1, (self.num_heads, -1))
            q = self.q_norm(q).unflatten(1, (f1 - f0, per_frame)).flatten(0, 1)  # [(B f), hw, H, D]
            attn = attention(q, k[:, f0:f1].flatten(0, 1), v[:, f0:f1].flatten(0, 1))
            y = self.linear2(attn.flatten(2).view(b, -1, d))
            out[:, f0 * per_frame:f1 * per_frame] = (tokens.float() + y.float()).to(dtype)
        return out


class ImageProjection(nn.Module):
    """CLIP ViT-H/14 features [B, 257, 1280] -> image context tokens [B, 257, d] (official `MLPProj`)."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), nn.LayerNorm(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


@dataclass
class AnimateConditions:
    """One segment's Animate inputs for a DiT forward (rows = CFG branches): CLIP features of the reference
    [B, 257, 1280]; pose latents [B, 16, F-1, h, w] for the latent frames after the reference one; face crops
    [B, 3, T, S, S] in [-1, 1] (the unconditional row gets -1 everywhere)."""

    clip_features: torch.Tensor
    pose_latents: torch.Tensor
    face_pixels: torch.Tensor

    def rows(self, index) -> "AnimateConditions":
        return AnimateConditions(self.clip_features[index], self.pose_latents[index], self.face_pixels[index])
