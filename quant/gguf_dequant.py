"""GGUF block dequantization in plain torch, so it runs on the compute device at forward time.

The raw quantized bytes stay the stored weight; each kernel turns `[n_blocks * block_bytes]` uint8 into
`[n_blocks * block_size]` float32 with the same arithmetic, in the same order, as `gguf.quants.dequantize`
(bit-exact; tests/test_gguf_dequant.py checks every type on random blocks). Layouts follow ggml's block
structs; K-quants pack 256 values per super-block with 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales.
"""
from __future__ import annotations

import torch

QK_K = 256
K_SCALE_SIZE = 12

# type name -> (values per block, bytes per block)
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "IQ4_NL": (32, 18), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}


def _f16(field: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian half-precision bytes -> [n, 1] float32."""
    return field.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k*group] bytes -> [n, 2k, group] uint8: per group of bytes, the low nibbles, then the high nibbles."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], -1, group)


def _bits(qh: torch.Tensor, group: int, count: int, width: int) -> torch.Tensor:
    """[n, k*group] bytes -> [n, k*count, group] uint8: `count` fields of `width` bits per byte, low first."""
    qh = qh.reshape(qh.shape[0], -1, 1, group)
    mask = (1 << width) - 1
    fields = [(qh >> (i * width)) & mask for i in range(count)]
    return torch.cat(fields, dim=2).reshape(qh.shape[0], -1, group)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b[:, :2]))


def _legacy4(b: torch.Tensor, with_min: bool, with_high: bool) -> torch.Tensor:
    """Q4_0, Q4_1, Q5_0, Q5_1: 32 values from nibbles (+ a 32-bit mask of fifth bits), scale d (+ min m)."""
    d = _f16(b[:, :2])
    offset = 2
    if with_min:
        m = _f16(b[:, 2:4])
        offset = 4
    q = _nibbles(b[:, offset + 4 * with_high:], 16).reshape(b.shape[0], 32)
    if with_high:  # bit i of the little-endian 32-bit mask is value i's fifth bit
        qh = b[:, offset:offset + 4].unsqueeze(-1)
        fifth = torch.cat([(qh >> i) & 1 for i in range(8)], dim=-1).reshape(b.shape[0], 32)
        q = q | (fifth << 4)
    if with_min:
        return q.float().mul_(d).add_(m)
    return q.float().sub_(16 if with_high else 8).mul_(d)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit sub-block scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _unpack_nibbles_to(out: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Write the nibbles of qs [n, k, group] into out [n, k, 2, group] (low, then high) as floats, in one pass."""
    out[:, :, 0] = qs & 0x0F
    out[:, :, 1] = qs >> 4
    return out


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:4 + K_SCALE_SIZE])
    scale = (d * sc.float()).reshape(n, 4, 2, 1)
    shift = (dmin * mn.float()).reshape(n, 4, 2, 1)
    q = torch.empty(n, 4, 2, 32, dtype=torch.float32, device=b.device)
    # in place: at 14B sizes every extra full-size temporary costs as much as the arithmetic
    _unpack_nibbles_to(q, b[:, 4 + K_SCALE_SIZE:].reshape(n, 4, 32)).mul_(scale).sub_(shift)
    return q.reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:4 + K_SCALE_SIZE])
    scale = (d * sc.float()).reshape(n, -1, 1)
    shift = (dmin * mn.float()).reshape(n, -1, 1)
    start = 4 + K_SCALE_SIZE
    high = _bits(b[:, start:start + QK_K // 8], 32, 8, 1)
    low = _nibbles(b[:, start + QK_K // 8:], 32)
    return (low | (high << 4)).float().mul_(scale).sub_(shift).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16].contiguous().view(torch.int8).float()
    d = _f16(b[:, -2:])
    scale = (d * scales).reshape(n, QK_K // 16, 1)
    q = _nibbles(ql, 64).reshape(n, -1, 32) | (_bits(qh, 32, 4, 2) << 4)
    return q.reshape(n, QK_K // 16, -1).float().sub_(32).mul_(scale).reshape(n, QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :QK_K // 16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale = (d * (scales & 0x0F).float()).reshape(n, QK_K // 16, 1)
    shift = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = _bits(b[:, 16:80], 32, 4, 2).reshape(n, QK_K // 16, 16).float()
    return q.mul_(scale).sub_(shift).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 96:104], 8).reshape(n, 16)
    high = _bits(b[:, 104:108], 4, 4, 2).reshape(n, 16)
    scales = (low | (high << 4)).float() - 32
    scale = (_f16(b[:, 108:110]) * scales).reshape(n, 16, 1)
    q = _bits(b[:, 32:96], 32, 4, 2).reshape(n, 16, 16)
    no_high_bit = _bits(b[:, :32], 32, 8, 1).reshape(n, 16, 16) ^ 1  # a set hmask bit means no -4 offset
    q = q.view(torch.int8) - (no_high_bit << 2).view(torch.int8)  # -4..3, exact
    return q.float().mul_(scale).reshape(n, QK_K)


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    """Q4_0's layout, with each nibble indexing a fixed non-linear table instead of q - 8."""
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=b.device)
    return _f16(b[:, :2]) * table[_nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).long()]


_KERNELS = {
    "Q8_0": _q8_0,
    "Q4_0": lambda b: _legacy4(b, with_min=False, with_high=False),
    "Q4_1": lambda b: _legacy4(b, with_min=True, with_high=False),
    "Q5_0": lambda b: _legacy4(b, with_min=False, with_high=True),
    "Q5_1": lambda b: _legacy4(b, with_min=True, with_high=True),
    "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


class UnsupportedQuantType(ValueError):
    pass


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               name: str = "tensor") -> torch.Tensor:
    """uint8 bytes of a GGUF tensor (on any device) -> `shape` in `dtype`, computed on that device."""
    if qtype not in BLOCKS:
        raise UnsupportedQuantType(f"{name}: GGUF type {qtype} is not supported "
                                   f"(supported: {', '.join(BLOCKS)})")
    values, nbytes = BLOCKS[qtype]
    numel = 1
    for dim in shape:
        numel *= dim
    if numel % values or raw.numel() != numel // values * nbytes:
        raise ValueError(f"{name}: {raw.numel()} bytes do not hold {numel} {qtype} values of shape {tuple(shape)}")
    raw = raw.reshape(-1)
    if qtype == "F32":
        out = raw.view(torch.float32)
    elif qtype == "F16":
        out = raw.view(torch.float16)
    elif qtype == "BF16":
        out = raw.view(torch.bfloat16)
    else:
        out = _KERNELS[qtype](raw.reshape(-1, nbytes))
    return out.reshape(shape).to(dtype)
