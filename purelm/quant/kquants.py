"""K-quant 256-weight super-blocks: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (decode only).

Each decoder takes `blocks` (n, bytes_per_block) uint8 and writes float32
into `out` (n, 256). Layouts follow ggml-common.h; the float steps
(`d * scale` first, then `* q`, then `- dmin * min`) copy gguf.quants so the
results are bit-identical.
"""
from __future__ import annotations

import numpy as np

from .legacy import f16_field
from .types import GGMLType

SHIFTS_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)
SHIFTS_4BIT = np.array([0, 4], dtype=np.uint8)
SHIFTS_1BIT = np.arange(8, dtype=np.uint8)


def spread(x: np.ndarray, shifts: np.ndarray, mask: int) -> np.ndarray:
    """(n, k) bytes -> (n, len(shifts), k): field i of every byte in row i.

    Packed K-quant fields run over whole byte groups: the first 2-bit (or
    4-bit, 1-bit) field of bytes 0..k-1 gives weights 0..k-1, the next field
    the following k weights, and so on.
    """
    return (x[:, None, :] >> shifts[None, :, None]) & np.uint8(mask)


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def decode_q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # scales[16] (low nibble scale, high nibble min) | qs[64] | d | dmin
    n = len(blocks)
    scales = blocks[:, :16]
    dl = f16_field(blocks, 80) * (scales & 0x0F)
    ml = f16_field(blocks, 82) * (scales >> 4)
    q = out.reshape(n, 2, 4, 32)
    for half in range(2):
        q[:, half] = spread(blocks[:, 16 + 32 * half:48 + 32 * half], SHIFTS_2BIT, 3)
    groups = out.reshape(n, 16, 16)
    groups *= dl[:, :, None]
    groups -= ml[:, :, None]


def decode_q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # hmask[32] | qs[64] | scales[12] (6-bit, split 4+2) | d
    n = len(blocks)
    scales = blocks[:, 96:108]
    low = spread(scales[:, :8], SHIFTS_4BIT, 0x0F).reshape(n, 16)
    high = spread(scales[:, 8:12], SHIFTS_2BIT, 0x03).reshape(n, 16)
    sc = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = f16_field(blocks, 108) * sc.astype(np.float32)

    q = np.empty((n, 2, 4, 32), np.uint8)
    for half in range(2):
        q[:, half] = spread(blocks[:, 32 + 32 * half:64 + 32 * half], SHIFTS_2BIT, 3)
    q = q.reshape(n, 8, 32).view(np.int8)
    # A clear hmask bit means "subtract 4".
    q -= (spread(blocks[:, :32], SHIFTS_1BIT, 1) ^ np.uint8(1)).view(np.int8) << np.int8(2)
    groups = out.reshape(n, 16, 16)
    groups[...] = q.reshape(n, 16, 16)
    groups *= dl[:, :, None]


def decode_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # d | dmin | scales[12] | qs[128] (4 chunks of 32 bytes, low then high nibbles)
    n = len(blocks)
    sc, mn = scale_min_k4(blocks[:, 4:16])
    dl = f16_field(blocks, 0) * sc
    ml = f16_field(blocks, 2) * mn
    q = out.reshape(n, 4, 2, 32)
    for c in range(4):
        q[:, c] = spread(blocks[:, 16 + 32 * c:48 + 32 * c], SHIFTS_4BIT, 0x0F)
    groups = out.reshape(n, 8, 32)
    groups *= dl[:, :, None]
    groups -= ml[:, :, None]


def decode_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # d | dmin | scales[12] | qh[32] (bit j -> group j) | qs[128]
    n = len(blocks)
    sc, mn = scale_min_k4(blocks[:, 4:16])
    dl = f16_field(blocks, 0) * sc
    ml = f16_field(blocks, 2) * mn
    q = np.empty((n, 4, 2, 32), np.uint8)
    for c in range(4):
        q[:, c] = spread(blocks[:, 48 + 32 * c:80 + 32 * c], SHIFTS_4BIT, 0x0F)
    q = q.reshape(n, 8, 32)
    q |= spread(blocks[:, 16:48], SHIFTS_1BIT, 1) << np.uint8(4)
    groups = out.reshape(n, 8, 32)
    groups[...] = q
    groups *= dl[:, :, None]
    groups -= ml[:, :, None]


def decode_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # ql[128] | qh[64] | scales[16] int8 | d; two halves of 128 weights each
    n = len(blocks)
    dl = f16_field(blocks, 208) * blocks[:, 192:208].view(np.int8)
    q = np.empty((n, 2, 4, 32), np.uint8)
    for half in range(2):
        ql = blocks[:, 64 * half:64 * half + 64]
        qh = blocks[:, 128 + 32 * half:160 + 32 * half]
        q[:, half] = spread(ql, SHIFTS_4BIT, 0x0F).reshape(n, 4, 32)
        q[:, half] |= spread(qh, SHIFTS_2BIT, 3) << np.uint8(4)
    groups = out.reshape(n, 16, 16)
    groups[...] = q.reshape(n, 16, 16)
    groups -= 32  # exact: small integers
    groups *= dl[:, :, None]


DECODERS = {
    GGMLType.Q2_K: decode_q2_k,
    GGMLType.Q3_K: decode_q3_k,
    GGMLType.Q4_K: decode_q4_k,
    GGMLType.Q5_K: decode_q5_k,
    GGMLType.Q6_K: decode_q6_k,
}
