"""GGUF encoders: legacy types through gguf-py, K-quants (Q4_K, Q5_K, Q6_K) with wanlite's own torch encoder.

gguf-py can only dequantize the K types, so the encoders below write the llama.cpp block layouts that
`gguf.quants.dequantize` (and `gguf_dequant`) read. Scales are chosen per sub-block by a small least-squares
search over candidate step sizes, then the sub-block scales are themselves quantized to 6 / 8 bits and the
values re-rounded against the scales actually stored.
"""
from __future__ import annotations

import numpy as np
import torch

from wanlite.quant.gguf_dequant import BLOCKS

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32")
ROWS_PER_CHUNK = 64  # bounds the encoder's temporaries (candidates × values) to a few hundred MB at 14B sizes


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] little-endian fp16 bytes."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _fit_affine(x: torch.Tensor, nmax: int, candidates: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [m, k]: (scale ≥ 0, offset ≥ 0) minimising Σ(scale·q − offset − x)², q ∈ [0, nmax] integer.

    Tries step sizes around (max − min)/nmax and keeps the least-squares refit with the smallest error."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=1, keepdim=True)
    span = (hi - lo).clamp(min=1e-12)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_offset = span / nmax, -lo
    for i in range(candidates):
        iscale = (nmax + 0.2 * (i - candidates // 3)) / span
        q = ((x - lo) * iscale).round_().clamp_(0, nmax)
        # least squares for x ≈ a·q + b, then keep b ≤ 0 (the formats store −b as an unsigned min)
        n = x.shape[1]
        sq, sx = q.sum(1, keepdim=True), x.sum(1, keepdim=True)
        sqq, sqx = (q * q).sum(1, keepdim=True), (q * x).sum(1, keepdim=True)
        det = n * sqq - sq * sq
        a = torch.where(det > 0, (n * sqx - sq * sx) / det.clamp(min=1e-12), span / nmax)
        b = torch.where(det > 0, (sx - a * sq) / n, lo).clamp(max=0)
        a = torch.where(det > 0, ((sqx - b * sq) / sqq.clamp(min=1e-12)), a).clamp(min=0)
        err = ((a * q + b - x) ** 2).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, a, best_scale)
        best_offset = torch.where(better, -b, best_offset)
    return best_scale, best_offset


def _quantize_6bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 8] non-negative sub-block scales -> (super-block fp16 factor [n, 1], 6-bit codes [n, 8])."""
    d = (values.amax(dim=1, keepdim=True) / 63).to(torch.float16).float()
    codes = torch.where(d > 0, (values / d.clamp(min=1e-30)).round(), torch.zeros_like(values)).clamp(0, 63)
    return d, codes.to(torch.uint8)


def _pack_scale_min_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of `gguf_dequant._scale_min_k4`: 8 six-bit scales and mins -> 12 bytes."""
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] & 0x30) << 2)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] & 0x30) << 2)
    m_d = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([d, m, m_d], dim=1)


def _k_affine(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q4_K / Q5_K: 256 values in 8 sub-blocks of 32, x ≈ d·sc·q − dmin·m, q < 2^bits."""
    n = x.shape[0]
    nmax = (1 << bits) - 1
    sub = x.reshape(n * 8, 32)
    scale, offset = _fit_affine(sub, nmax)
    d, sc = _quantize_6bit(scale.reshape(n, 8))
    dmin, mn = _quantize_6bit(offset.reshape(n, 8))
    eff_scale = (d * sc.float()).reshape(n * 8, 1)
    eff_offset = (dmin * mn.float()).reshape(n * 8, 1)
    q = torch.where(eff_scale > 0, ((sub + eff_offset) / eff_scale.clamp(min=1e-30)).round(),
                    torch.zeros_like(sub)).clamp(0, nmax).to(torch.uint8).reshape(n, 8, 32)
    head = [_half_bytes(d), _half_bytes(dmin), _pack_scale_min_k4(sc, mn)]
    low = q & 0x0F
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)  # byte g·32+j: sub-blocks 2g (low), 2g+1 (high)
    if bits == 4:
        return torch.cat(head + [qs], dim=1)
    high = (q >> 4) & 1  # bit i of qh[j] is the fifth bit of sub-block i, value j
    qh = torch.zeros(n, 32, dtype=torch.uint8)
    for i in range(8):
        qh |= high[:, i] << i
    return torch.cat(head + [qh, qs], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K: 16 sub-blocks of 16, x ≈ d·sc·(q − 32), signed 8-bit sc, q < 64."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    # the value of largest magnitude maps to −32, as llama.cpp does, so the asymmetric range is used fully
    idx = sub.abs().argmax(dim=2, keepdim=True)
    signed_max = sub.gather(2, idx)
    scale = (signed_max / -32).squeeze(2)  # [n, 16]
    d = (scale.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16).float()
    sc = torch.where(d > 0, (scale / d.clamp(min=1e-30)).round(), torch.zeros_like(scale)).clamp(-128, 127)
    eff = (d * sc).unsqueeze(2)
    q = torch.where(eff != 0, (sub / torch.where(eff != 0, eff, torch.ones_like(eff))).round(),
                    torch.zeros_like(sub)).clamp(-32, 31).add(32).to(torch.uint8).reshape(n, 256)
    low, high = q & 0x0F, q >> 4
    # ql byte g·64+j: low nibble of value 128g+j, high nibble of value 128g+64+j
    low = low.reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    # qh byte g·32+j, bits 2i..2i+1: top two bits of value 128g+32i+j
    high = high.reshape(n, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh.reshape(n, 64), scales, _half_bytes(d)], dim=1)


# llama.cpp's substitutes when a row does not split into 256-value super-blocks
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
K_ENCODERS = {"Q4_K": lambda x: _k_affine(x, 4), "Q5_K": lambda x: _k_affine(x, 5), "Q6_K": _q6_k}
QUANTIZABLE = LEGACY + tuple(K_ENCODERS)


def type_for_row(qtype: str, row: int) -> str | None:
    """The type a row of `row` values gets when `qtype` is asked for (a fallback for K types), or None."""
    if row % BLOCKS[qtype][0] == 0:
        return qtype
    fallback = K_FALLBACK.get(qtype)
    return fallback if fallback is not None and row % BLOCKS[fallback][0] == 0 else None


def quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """A float tensor -> its GGUF bytes as uint8 [rows, bytes per row] (last dim = the GGUF row)."""
    if qtype not in QUANTIZABLE:
        raise ValueError(f"wanlite cannot encode GGUF type {qtype} (encodable: {', '.join(QUANTIZABLE)})")
    values, nbytes = BLOCKS[qtype]
    rows, cols = weight.reshape(-1, weight.shape[-1]).shape
    if cols % values:
        raise ValueError(f"a row of {cols} values does not split into {qtype} blocks of {values}")
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    def legacy(chunk: torch.Tensor) -> torch.Tensor:
        packed = gguf_quantize(chunk.reshape(-1, cols).cpu().numpy(), GGMLQuantizationType[qtype])
        return torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8))

    encode = K_ENCODERS.get(qtype, legacy)
    # a few rows at a time: whole-tensor fp32 temporaries fragment the heap and inflate quantize-on-load peaks
    w = weight.detach().reshape(rows, cols)
    out = torch.empty(rows, cols // values * nbytes, dtype=torch.uint8)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = w[start:start + ROWS_PER_CHUNK].float().reshape(-1, values)
        out[start:start + ROWS_PER_CHUNK] = encode(chunk).reshape(-1, out.shape[1])
    return out
