"""Wan DiT building blocks with the official parameter names (`wan/modules/model.py`), so no key remapping.

Numerics: the residual stream stays in the compute dtype; norms, modulation and the gated residual adds are
fp32 islands, as in the reference. Modulation vectors are per latent frame (`[B, Fe, 6, d]`, Fe = 1 when every
token shares the timestep), never the official per-token `[B, L, 6, d]` tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from wanlite.models.attention import attention
from wanlite.models.rope import apply_rope

# Parameters kept in fp32 whatever the compute dtype: tiny, and they feed fp32 arithmetic.
FP32_PARAM_SUFFIXES = ("modulation", "norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")


def keeps_fp32(name: str) -> bool:
    return name.endswith(FP32_PARAM_SUFFIXES)


def linear_fp32(linear: nn.Linear, x: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """`linear(x)` computed in fp32 (the reference's autocast-fp32 islands) without an fp32 copy of a big
    low-precision weight: the weight is upcast a slab of output rows at a time. The layer's forward hooks run
    as they would on `linear(x)`, so a runtime LoRA branch applies here as everywhere."""
    x = x.float()
    w, b = linear.weight, linear.bias
    if w.dtype == torch.float32:
        out = F.linear(x, w, b if b is None else b.float())
    else:
        out = torch.cat([F.linear(x, w[sl].float(), None if b is None else b[sl].float())
                         for sl in (slice(i, i + rows_per_chunk) for i in range(0, w.shape[0], rows_per_chunk))],
                        dim=-1)
    for hook in linear._forward_hooks.values():  # what `linear(x)` would run after forward (a LoRA branch)
        result = hook(linear, (x,), out)
        out = out if result is None else result
    return out


class WanRMSNorm(nn.Module):
    """RMSNorm over the full hidden size (across heads), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """LayerNorm in fp32; returns fp32 (the caller modulates in fp32 and casts once)."""
    weight = None if norm is None else norm.weight.float()
    bias = None if norm is None else norm.bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """View tokens [B, L, d] as [B, Fe, L/Fe, d] so per-frame vectors [B, Fe, 1, d] broadcast."""
    return x.unflatten(1, (frames, -1))


@dataclass
class BlockInputs:
    """Everything a block needs besides the hidden states; built once per DiT forward."""

    e0: torch.Tensor  # [B, R, 6, d] fp32 modulation rows from the timestep(s)
    context: torch.Tensor  # [B, text_len, d] embedded text
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [L, head_dim/2]
    chunk: int | None = None  # tokens per chunk for everything but the attention's keys/values (None: all)
    # tokens per modulation row; None: the R rows split the tokens evenly (one per latent frame, or all)
    split: tuple[int, ...] | None = None
    audio: object | None = None  # wanlite.models.s2v.AudioTokens for the blocks followed by an audio injector
    image_context: torch.Tensor | None = None  # Animate: [B, 257, d] CLIP image tokens for the cross-attention
    face: object | None = None  # Animate: wanlite.models.animate.FaceTokens for the face adapters
    rows_apart: bool = False  # per-block CFG: each batch row (CFG branch) through a block on its own
    # per-block CFG: each row's output is written over its input, so a block holds one [B, L, d] tensor, not
    # two; only while nobody keeps the blocks' inputs (a step cache turns it off for the ranges it keeps)
    overwrite: bool = False
    # sequence parallel (wanlite.parallel.SequenceParallel): these are one rank's tokens; its `attention` swaps
    # tokens for heads with the other ranks around the self-attention
    parallel: object | None = None

    def rows(self, index: torch.Tensor) -> "BlockInputs":
        """The inputs of some batch rows only (a step cache running the middle blocks for one CFG branch)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return BlockInputs(self.e0[index], self.context[index], self.rope, self.chunk, self.split,
                           None if self.audio is None else self.audio.rows(index), pick(self.image_context),
                           None if self.face is None else self.face.rows(index), self.rows_apart, self.overwrite,
                           self.parallel)

    def keeping_input(self) -> "BlockInputs":
        """These inputs for a block range whose input the caller still needs afterwards."""
        return replace(self, overwrite=False) if self.overwrite else self


def modulate(t: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split) -> torch.Tensor:
    """t [B, L, d] fp32 * (1 + scale) + shift, row r of shift/scale [B, R, 1, d] applying to its tokens."""
    if split is None:
        return (per_frame(t, shift.shape[1]) * (1 + scale) + shift).flatten(1, 2)
    return torch.cat([p * (1 + scale[:, r]) + shift[:, r] for r, p in enumerate(t.split(split, dim=1))], dim=1)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, split) -> torch.Tensor:
    """x + y * gate in fp32, cast back to x's dtype; rows of gate as in `modulate`."""
    if split is None:
        frames = gate.shape[1]
        return (per_frame(x.float(), frames) + per_frame(y.float(), frames) * gate).flatten(1, 2).to(x.dtype)
    parts = zip(x.split(split, dim=1), y.split(split, dim=1))
    return torch.cat([(a.float() + b.float() * gate[:, r]).to(x.dtype) for r, (a, b) in enumerate(parts)], dim=1)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], parallel=None) -> torch.Tensor:
        q = apply_rope(self._heads(self.norm_q(self.q(x))), *rope)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope)
        v = self._heads(self.v(x))
        return self.o((attention(q, k, v) if parallel is None else parallel.attention(q, k, v)).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Queries from video tokens, keys/values from all text_len context rows (no mask, no RoPE); with `image`
    (Animate) a second key/value set from CLIP image tokens whose attention output is added before `o`."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool = False):
        super().__init__(dim, num_heads, eps)
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def keys_values(self, context: torch.Tensor, image: torch.Tensor | None = None) -> list:
        kvs = [(self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))]
        if image is not None:
            kvs.append((self._heads(self.norm_k_img(self.k_img(image))), self._heads(self.v_img(image))))
        return kvs

    def attend(self, x: torch.Tensor, kvs: list) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        out = attention(q, *kvs[0])
        for k, v in kvs[1:]:
            out = out + attention(q, k, v)
        return self.o(out.flatten(2))

    def forward(self, x: torch.Tensor, context: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, self.keys_values(context, image))


class WanBlock(nn.Module):
    """`WanAttentionBlock`: modulated self-attention, cross-attention, modulated GELU-tanh FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, image_context: bool = False):
        super().__init__()
        self.eps = eps
        self.audio_injector: nn.Module | None = None  # S2V: wanlite.models.s2v.AudioInjector after this block
        self.face_adapter: nn.Module | None = None  # Animate: wanlite.models.animate.FaceAdapter after it
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, image=image_context)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        # divided in place: an out-of-place op on a meta tensor imports torch._dynamo (~3 s at the first build)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim).div_(dim**0.5))

    def forward(self, x: torch.Tensor, inputs: BlockInputs, out: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, L, d] in the compute dtype; rebound as soon as each stage is done, so this frame never keeps
        # the block's input alive (the runner dropped its own reference). `out`: where a chunked block writes.
        if inputs.rows_apart and x.shape[0] > 1:  # one branch's temporaries at a time; the weights stay put
            # a row's input is read in full before its output lands (the chunked pass reads each chunk first)
            out = x if inputs.overwrite else torch.empty(x.shape, dtype=x.dtype, device=x.device)
            for i in range(x.shape[0]):
                row = self.forward(x[i:i + 1], inputs.rows(slice(i, i + 1)), out[i:i + 1])
                if row.data_ptr() != out[i:i + 1].data_ptr():
                    out[i:i + 1] = row
            return out
        if inputs.chunk and inputs.chunk < x.shape[1]:
            x = self.forward_chunked(x, inputs, inputs.chunk, out)
        else:
            split = inputs.split
            mod = self.modulation.float().unsqueeze(0) + inputs.e0  # [B, R, 6, d]
            shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unsqueeze(2).unbind(3)

            h = modulate(layer_norm_fp32(x, self.eps), shift_msa, scale_msa, split)
            x = gated_add(x, self.self_attn(h.to(x.dtype), inputs.rope, inputs.parallel), gate_msa, split)

            h = layer_norm_fp32(x, self.eps, self.norm3).to(x.dtype)
            x = (x.float() + self.cross_attn(h, inputs.context, inputs.image_context).float()).to(x.dtype)

            h = modulate(layer_norm_fp32(x, self.eps), shift_ffn, scale_ffn, split)
            x = gated_add(x, self.ffn(h.to(x.dtype)), gate_ffn, split)
        if self.audio_injector is not None and inputs.audio is not None:
            frames = inputs.audio.local.shape[1]
            per_chunk = None if not inputs.chunk else max(1, inputs.chunk * frames // inputs.audio.noisy_tokens)
            x = self.audio_injector(x, inputs.audio, per_chunk)
        if self.face_adapter is not None and inputs.face is not None:
            frames = inputs.face.tokens.shape[1]
            per_chunk = None if not inputs.chunk else max(1, inputs.chunk * frames // x.shape[1])
            x = self.face_adapter(x, inputs.face, per_chunk)
        return x

    def forward_chunked(self, x: torch.Tensor, inputs: BlockInputs, chunk: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` with every per-token step done `chunk` tokens at a time (whole latent frames when each
        frame has its own timestep). Only the self-attention keys/values, the output and the input live at
        full length: ~8 x B*L*d bytes in bf16 instead of ~28 (planner/estimate.py), the same numbers up to
        GEMM rounding."""
        spans = _row_spans(x.shape[1], inputs, chunk)
        mod = self.modulation.float().unsqueeze(0) + inputs.e0
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unsqueeze(2).unbind(3)

        def modulated(xc, rows, shift, scale):
            n = rows.stop - rows.start
            return (per_frame(layer_norm_fp32(xc, self.eps), n) * (1 + scale[:, rows]) + shift[:, rows]).flatten(1, 2)

        def gated(xc, yc, gate, rows):
            n = rows.stop - rows.start
            return (per_frame(xc.float(), n) + per_frame(yc.float(), n) * gate[:, rows]).flatten(1, 2).to(x.dtype)

        cos, sin = inputs.rope
        sa, ca = self.self_attn, self.cross_attn
        def full_length() -> torch.Tensor:  # contiguous (x may be a transposed view): SDPA's fast kernels need it
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)

        parallel = inputs.parallel
        keys, values = full_length(), full_length()
        # sequence parallel: every query is exchanged with the other ranks at once (they must all exchange
        # alike, whatever their chunks), so this rank's queries are kept whole too
        queries = None if parallel is None else full_length()
        for s, e, rows in spans:
            h = modulated(x[:, s:e], rows, shift_msa, scale_msa).to(x.dtype)
            keys[:, s:e] = apply_rope(sa._heads(sa.norm_k(sa.k(h))), cos[s:e], sin[s:e]).flatten(2)
            values[:, s:e] = sa.v(h)
            if queries is not None:
                queries[:, s:e] = apply_rope(sa._heads(sa.norm_q(sa.q(h))), cos[s:e], sin[s:e]).flatten(2)
        keys, values = sa._heads(keys), sa._heads(values)
        if parallel is not None:
            attended = parallel.attention(sa._heads(queries), keys, values, chunk).flatten(2)
            del queries
        out = full_length() if out is None else out
        for s, e, rows in spans:
            if parallel is None:
                h = modulated(x[:, s:e], rows, shift_msa, scale_msa).to(x.dtype)
                q = apply_rope(sa._heads(sa.norm_q(sa.q(h))), cos[s:e], sin[s:e])
                y = attention(q, keys, values).flatten(2)
            else:
                y = attended[:, s:e]
            out[:, s:e] = gated(x[:, s:e], sa.o(y), gate_msa, rows)
        del keys, values
        if parallel is not None:
            del attended
        context_kvs = ca.keys_values(inputs.context, inputs.image_context)
        for s, e, _ in spans:
            xc = out[:, s:e]
            y = ca.attend(layer_norm_fp32(xc, self.eps, self.norm3).to(x.dtype), context_kvs)
            xc.copy_((xc.float() + y.float()).to(x.dtype))
        del context_kvs
        for s, e, rows in spans:
            xc = out[:, s:e]
            y = self.ffn(modulated(xc, rows, shift_ffn, scale_ffn).to(x.dtype))
            xc.copy_(gated(xc, y, gate_ffn, rows))
        return out


def _row_spans(length: int, inputs: BlockInputs, chunk: int) -> list[tuple[int, int, slice]]:
    return token_spans(length, inputs.e0.shape[1], inputs.split, chunk)


def token_spans(length: int, frames: int, split: tuple[int, ...] | None, chunk: int) -> list[tuple[int, int, slice]]:
    """Token chunks [s, e) of about `chunk` tokens, each with the modulation rows it uses: chunks never
    straddle two rows' segments (`split`: the tokens of each row; None: `frames` rows of equal length), and
    with one row per latent frame they hold whole frames."""
    if split is not None:
        spans, start = [], 0
        for r, n in enumerate(split):
            spans += [(s, min(s + chunk, start + n), slice(r, r + 1)) for s in range(start, start + n, chunk)]
            start += n
        return spans
    if frames == 1:
        return [(s, min(s + chunk, length), slice(0, 1)) for s in range(0, length, chunk)]
    per_frame_tokens = length // frames
    chunk = max(per_frame_tokens, chunk // per_frame_tokens * per_frame_tokens)
    return [(s, min(s + chunk, length), slice(s // per_frame_tokens, min(s + chunk, length) // per_frame_tokens))
            for s in range(0, length, chunk)]


class Head(nn.Module):
    """Output head: LayerNorm, 2-way modulation from the time embedding `e` (not `e0`), linear to patches."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim).div_(dim**0.5))

    def forward(self, x: torch.Tensor, e: torch.Tensor, chunk: int | None = None,
                split: tuple[int, ...] | None = None) -> torch.Tensor:
        # e: [B, Fe, d] fp32 -> shift, scale: [B, Fe, 1, d]; `split`: the tokens of each row (a rank's slice),
        # None: equal frames. With `chunk`, about that many tokens (whole latent frames) at a time: the normed
        # and modulated fp32 copies of every token would be 4x the tokens' bytes
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unsqueeze(2).unbind(3)
        length = x.shape[1]
        out = []
        for s, stop, rows in token_spans(length, e.shape[1], split, chunk or length):
            h = per_frame(layer_norm_fp32(x[:, s:stop], self.eps), rows.stop - rows.start) * (1 + scale[:, rows])
            out.append(linear_fp32(self.head, (h + shift[:, rows]).flatten(1, 2)))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)
