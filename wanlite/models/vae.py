"""The Wan2.1 (z16, 4x8x8) and Wan2.2 (z48, 4x16x16) video VAEs as one class driven by a VAESpec.

Official sources: `wan/modules/vae2_1.py` and `wan/modules/vae2_2.py`. Both encode pixel frames in causal chunks
of 1, 4, 4, ... and decode one latent frame at a time, carrying the last two input frames of every causal conv
between chunks, so activation memory is set by one chunk, not by the clip length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanlite.specs import VAESpec

CACHE_T = 2  # frames each causal conv remembers between chunks
REPEAT = "Rep"  # marks an upsample3d whose first chunk skipped its temporal conv


class FeatureCache:
    """Per-call chunk memory: one slot per cached layer, visited in forward order in every chunk."""

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def start_chunk(self) -> None:
        self.index = 0

    def peek(self):
        if self.index == len(self.slots):
            self.slots.append(None)
        return self.slots[self.index]

    def put(self, value) -> None:
        self.slots[self.index] = value
        self.index += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; earlier frames can stand in for the zero padding."""

    def __init__(self, *args, padding=0, **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.pad = (pw, pw, ph, ph, 2 * pt, 0)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self.pad)
        if past is not None and pad[4] > 0:
            x = torch.cat([past.to(x), x], dim=2)
            pad[4] = max(0, pad[4] - past.shape[2])
        kt = self.kernel_size[0]
        if x.shape[2] == 1 and pad[4] == kt - 1 and self.stride[0] == 1 and self.dilation[0] == 1:
            # A lone frame behind zero padding meets only the kernel's last time slice: a 2-D conv, kt times cheaper.
            frame = F.pad(x[:, :, 0], pad[:4])
            out = F.conv2d(frame, self.weight[:, :, -1], self.bias, self.stride[1:], dilation=self.dilation[1:],
                           groups=self.groups)
            return out.unsqueeze(2)
        return super().forward(F.pad(x, pad))


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    """Run a causal conv with the frames of the previous chunk, and remember this chunk's last frames."""
    if cache is None:
        return conv(x)
    past = cache.peek()
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and past is not None:
        keep = torch.cat([past[:, :, -1:].to(keep), keep], dim=2)
    out = conv(x, past)
    cache.put(keep)
    return out


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain `gamma` (official `RMS_norm`)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class NearestUpsample2x(nn.Module):
    """Spatial nearest-exact x2, computed in fp32 as the reference does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


def frames_to_images(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention inside each frame (mid-block only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C]
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        return x + frames_to_images(self._attend, x)


class Resample(nn.Module):
    """Spatial x2 up/down per frame, plus a temporal x2 conv for the 3d modes."""

    def __init__(self, dim: int, mode: str, up_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, up_out_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _time_upsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        past = cache.peek()
        if past is None:  # first chunk: one latent frame stays one frame
            cache.put(REPEAT)
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            head = torch.zeros_like(keep) if isinstance(past, str) else past[:, :, -1:].to(keep)
            keep = torch.cat([head, keep], dim=2)
        # the chunk right after the first gets zero temporal padding, not the first frame, as context
        x = self.time_conv(x) if isinstance(past, str) else self.time_conv(x, past)
        cache.put(keep)
        b, c2, t, h, w = x.shape
        return x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, t * 2, h, w)

    def _time_downsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        past = cache.peek()
        if past is None:  # first chunk (one frame): remember it, no temporal conv yet
            cache.put(x.clone())
            return x
        keep = x[:, :, -1:].clone()
        x = self.time_conv(torch.cat([past[:, :, -1:].to(x), x], dim=2))
        cache.put(keep)
        return x

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._time_upsample(x, cache)
        x = frames_to_images(self.resample, x)
        if self.mode == "downsample3d" and cache is not None:
            x = self._time_downsample(x, cache)
        return x


class AvgDown3D(nn.Module):
    """Wan2.2 parameter-free shortcut: space/time to channels, then average channel groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, (self.ft - x.shape[2] % self.ft) % self.ft, 0))
        b, c, t, h, w = x.shape
        ft, fs = self.ft, self.fs
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan2.2 parameter-free shortcut: repeat channels, then channels to space/time."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        ft, fs = self.ft, self.fs
        x = x.view(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownStage(nn.Module):
    """Wan2.2 encoder stage: residual blocks (+ resample) beside an AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpStage(nn.Module):
    """Wan2.2 decoder stage: residual blocks (+ resample) beside a DupUp3D shortcut on upsampling stages."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None, first_chunk: bool) -> torch.Tensor:
        out = x
        for layer in self.upsamples:
            out = layer(out, cache)
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x, first_chunk)


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    for layer in head:
        x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class Encoder(nn.Module):
    def __init__(self, spec: VAESpec):
        super().__init__()
        dims = [spec.dim * m for m in (1, *spec.dim_mult)]
        last = len(spec.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * spec.patch_size**2, dims[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = spec.temporal_downsample[i] if i < last else False
            if spec.version == "2.2":
                stages.append(DownStage(d_in, d_out, spec.num_res_blocks, temporal, down=i != last))
                continue
            for j in range(spec.num_res_blocks):
                stages.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i != last:
                stages.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(stages)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], spec.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


class Decoder(nn.Module):
    def __init__(self, spec: VAESpec):
        super().__init__()
        mult = spec.dim_mult
        dims = [spec.dec_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = spec.temporal_downsample[::-1]
        last = len(mult) - 1
        self.wan22 = spec.version == "2.2"
        self.conv1 = CausalConv3d(spec.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        stages: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = temporal_up[i] if i < last else False
            if self.wan22:
                stages.append(UpStage(d_in, d_out, spec.num_res_blocks + 1, temporal, up=i != last))
                continue
            if i > 0:
                d_in //= 2  # the Wan2.1 upsampling conv halves the channels
            for j in range(spec.num_res_blocks + 1):
                stages.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i != last:
                stages.append(Resample(d_out, "upsample3d" if temporal else "upsample2d", up_out_dim=d_out // 2))
        self.upsamples = nn.ModuleList(stages)
        self.head = _head(dims[-1], 3 * spec.patch_size**2)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None, first_chunk: bool) -> torch.Tensor:
        return self.upsample(self.middle_features(x, cache), cache, first_chunk)

    def middle_features(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """conv1 and the middle block (with its frame-wide self-attention), at latent resolution."""
        x = cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return x

    def upsample(self, x: torch.Tensor, cache: FeatureCache | None, first_chunk: bool) -> torch.Tensor:
        """Everything after the middle block: local convolutions only, so it can run tile by tile."""
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk) if self.wan22 else layer(x, cache)
        return _run_head(self.head, x, cache)


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles for the VAE, in latent pixels: `tile` wide, neighbours sharing `overlap` (blended linearly)."""

    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile < 2 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"Tiling(tile={self.tile}, overlap={self.overlap}): need tile >= 2 and "
                             "0 <= overlap < tile")

    def spans(self, length: int) -> list[tuple[int, int]]:
        """[start, end) tiles covering 0..length; the last one is pulled back to end at `length`."""
        if length <= self.tile:
            return [(0, length)]
        step = self.tile - self.overlap
        starts = list(range(0, length - self.tile, step)) + [length - self.tile]
        return [(a, a + self.tile) for a in dict.fromkeys(starts)]


# Fraction of each shared strip, at both of its ends, where a tile gets no weight: a tile's outermost pixels
# saw zero padding instead of their neighbours, and those errors decay inwards. Blending linearly over the
# middle half only keeps them out (bench/results/vae_tiling.json: Wan2.2 VAE +10 dB over a full-strip ramp).
EDGE_MARGIN = 0.25


def _ramp(spans: list[tuple[int, int]], index: int, scale: int, device) -> torch.Tensor:
    """Blend weights along one axis for tile `index`, in output pixels: 0 over the outer quarter of each part
    shared with a neighbour, rising (falling) linearly over its middle half, 1 elsewhere and at the image
    border. A neighbour's weights mirror these, so each shared pixel's weights sum to 1."""
    start, end = spans[index]
    pos = torch.arange(start * scale, end * scale, device=device, dtype=torch.float32) + 0.5
    w = torch.ones_like(pos)
    if index > 0:
        a, b = start * scale, spans[index - 1][1] * scale
        margin = EDGE_MARGIN * (b - a)
        w = torch.minimum(w, ((pos - a - margin) / (b - a - 2 * margin)).clamp(0, 1))
    if index + 1 < len(spans):
        a, b = spans[index + 1][0] * scale, end * scale
        margin = EDGE_MARGIN * (b - a)
        w = torch.minimum(w, ((b - margin - pos) / (b - a - 2 * margin)).clamp(0, 1))
    return w


def blend_tiles(run, x: torch.Tensor, tiling: Tiling, in_scale: int, out_scale: int, out_device=None) -> torch.Tensor:
    """Run `run(piece, k)` on the k-th overlapping spatial tile of x [B, C, T, H, W] (tiles in units of
    `in_scale` pixels) and blend the results (each `out_scale`/`in_scale` times larger spatially) into one
    tensor on `out_device`. Only one tile's activations exist at a time; the output and the weight sums live
    on `out_device`."""
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tiling.spans(h), tiling.spans(w)
    out = weight = None
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            piece = run(x[..., y0 * in_scale:y1 * in_scale, x0 * in_scale:x1 * in_scale], i * len(cols) + j)
            piece = piece.to(out_device or piece.device, torch.float32)
            if out is None:
                shape = (*piece.shape[:3], h * out_scale, w * out_scale)
                out = torch.zeros(shape, device=piece.device)
                weight = torch.zeros(shape[-2:], device=piece.device)
            mask = _ramp(rows, i, out_scale, piece.device)[:, None] * _ramp(cols, j, out_scale, piece.device)[None]
            region = (..., slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale))
            out[region] += piece * mask
            weight[region] += mask
    return out / weight


class WanVAE(nn.Module):
    """encode(video in [-1, 1]) -> normalised latents; decode(latents) -> video clamped to [-1, 1]."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)
        self.conv1 = CausalConv3d(spec.z_dim * 2, spec.z_dim * 2, 1)
        self.conv2 = CausalConv3d(spec.z_dim, spec.z_dim, 1)
        self.decoder = Decoder(spec)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.spec.latent_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.spec.latent_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        # b c f (h q) (w r) -> b (c r q) f h w
        p = self.spec.patch_size
        if p == 1:
            return x
        b, c, f, h, w = x.shape
        x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
        return x.reshape(b, c * p * p, f, h // p, w // p)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.spec.patch_size
        if p == 1:
            return x
        b, cpp, f, h, w = x.shape
        x = x.view(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
        return x.reshape(b, cpp // (p * p), f, h * p, w * p)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 4k+1, H, W] in [-1, 1] -> normalised latent mean [B, z, k+1, H/s, W/s]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode takes video [B, 3, F, H, W], got {tuple(video.shape)}")
        _, _, frames, h, w = video.shape
        stride = self.spec.stride[1]
        if h % stride or w % stride:
            raise ValueError(f"height and width must be multiples of {stride}, got {h}x{w}")
        if (frames - 1) % 4:
            raise ValueError(f"encode needs 4k+1 frames, got {frames}")
        x = self._patchify(video.to(self.conv1.weight.dtype))
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, frames, 4)]
        outs = []
        for chunk in chunks:
            cache.start_chunk()
            outs.append(self.encoder(chunk, cache))
        mu = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)[0]
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """normalised latents [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), h*s, w*s] clamped to [-1, 1].
        Training passes clamp=False: the clamp has no gradient outside [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.spec.z_dim:
            raise ValueError(f"decode takes latents [B, {self.spec.z_dim}, T, h, w], got {tuple(latents.shape)}")
        return torch.cat(list(self.decode_chunks(latents, clamp)), dim=2)

    def decode_chunks(self, latents: torch.Tensor, clamp: bool = True):
        """`decode` as a generator: the video of each latent frame ([B, 3, 1 or 4, H, W]) as soon as the
        causal decoder produces it, so a writer can consume frames without the whole float video existing."""
        z = latents.to(self.conv2.weight.dtype)
        mean, std = self._stats(z)
        x = self.conv2(z * std + mean)
        cache = FeatureCache()
        for i in range(x.shape[2]):
            cache.start_chunk()
            video = self._unpatchify(self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0))
            yield video.clamp(-1, 1) if clamp else video

    def decode_tiled(self, latents: torch.Tensor, tiling: Tiling, out_device=None,
                     clamp: bool = True) -> torch.Tensor:
        """`decode` with the upsampling stages run one overlapping spatial tile at a time (each tile through all
        frames with its own causal cache, freed before the next), blended linearly; the float32 result is
        gathered on `out_device` (default: the latents' device). conv1 and the middle block, whose
        self-attention must see the whole frame, run untiled first: at 1/8 or 1/16 resolution they are small
        next to the upsampling stages, where the memory is."""
        z = latents.to(self.conv2.weight.dtype)
        mean, std = self._stats(z)
        x = self.conv2(z * std + mean)
        cache = FeatureCache()
        features = []
        for i in range(x.shape[2]):
            cache.start_chunk()
            features.append(self.decoder.middle_features(x[:, :, i:i + 1], cache))
        del cache

        def upsample(piece: torch.Tensor, k: int) -> torch.Tensor:
            tile_cache, outs = FeatureCache(), []
            for i in range(piece.shape[2]):
                tile_cache.start_chunk()
                outs.append(self.decoder.upsample(piece[:, :, i:i + 1], tile_cache, first_chunk=i == 0))
            return torch.cat(outs, dim=2)

        stride = self.spec.stride[1] // self.spec.patch_size
        video = self._unpatchify(blend_tiles(upsample, torch.cat(features, dim=2), tiling, 1, stride, out_device))
        return video.clamp(-1, 1) if clamp else video

    def encode_tiled(self, video: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        """`encode` one overlapping spatial tile at a time (tiles in latent pixels), blended in latent space."""
        stride = self.spec.stride[1]
        if video.shape[-2] % stride or video.shape[-1] % stride:
            raise ValueError(f"height and width must be multiples of {stride}, got {video.shape[-2]}x{video.shape[-1]}")
        return blend_tiles(lambda piece, k: self.encode(piece), video, tiling, stride, 1).to(self.conv1.weight.dtype)
