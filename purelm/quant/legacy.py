"""Legacy 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml-common.h).

Decoders take `blocks` (n, bytes_per_block) uint8 and write float32 into
`out` (n, 32). Encoders take values (n, 32) and write bytes into `out`
(n, bytes_per_block).

The float operations (and their order) copy gguf.quants step by step so the
results are bit-identical: e.g. the scale is applied as `d * q + m`, never
as a fused or reordered expression, and quantizing uses the same
`1 / d`, `np.trunc` and round-half-away steps.
"""
from __future__ import annotations

import numpy as np

from .types import GGMLType


def f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 stored at byte `offset` of each block, as float32 (n, 1)."""
    return blocks[:, offset:offset + 2].view(np.float16).astype(np.float32)


def unpack_nibbles(qs: np.ndarray, q: np.ndarray) -> None:
    """Low nibbles of the 16 bytes give weights 0..15, high nibbles 16..31."""
    np.bitwise_and(qs, np.uint8(0x0F), out=q[:, :16])
    np.right_shift(qs, np.uint8(4), out=q[:, 16:])


def high_bits(qh: np.ndarray) -> np.ndarray:
    """The 5th bit of each weight, shifted into place: (n, 32) uint8 of 0/16.

    qh is a little-endian uint32 whose bit j belongs to weight j.
    """
    return np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)


def decode_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = f16_field(blocks, 0)
    q = np.empty(out.shape, np.uint8)
    unpack_nibbles(blocks[:, 2:], q)
    out[...] = q
    out -= 8  # exact: small integers
    out *= d


def decode_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = np.empty(out.shape, np.uint8)
    unpack_nibbles(blocks[:, 4:], q)
    out[...] = q
    out *= d
    out += m


def decode_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = f16_field(blocks, 0)
    q = np.empty(out.shape, np.uint8)
    unpack_nibbles(blocks[:, 6:], q)
    q |= high_bits(blocks[:, 2:6])
    out[...] = q
    out -= 16
    out *= d


def decode_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = np.empty(out.shape, np.uint8)
    unpack_nibbles(blocks[:, 8:], q)
    q |= high_bits(blocks[:, 4:8])
    out[...] = q
    out *= d
    out += m


def decode_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks[:, 2:].view(np.int8)
    out *= f16_field(blocks, 0)


# --- quantizing (same steps as gguf.quants, hence same bits) ---

def inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d)


def abs_max_signed(blocks: np.ndarray) -> np.ndarray:
    """The value with the largest magnitude in each block, sign kept (n, 1)."""
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    return np.take_along_axis(blocks, imax, axis=-1)


def round_half_away(x: np.ndarray) -> np.ndarray:
    # roundf() semantics (gguf's np_roundf), not numpy's round-half-even.
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    return np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")


def store_f16(out: np.ndarray, offset: int, value: np.ndarray) -> None:
    out[:, offset:offset + 2] = value.astype(np.float16).view(np.uint8)


def encode_q4_0(values: np.ndarray, out: np.ndarray) -> None:
    x = values.astype(np.float32, copy=False)
    d = abs_max_signed(x) / -8
    q = np.trunc(x * inverse(d) + np.float32(8.5), dtype=np.float32)
    q = q.astype(np.uint8).clip(0, 15)
    store_f16(out, 0, d)
    out[:, 2:] = pack_nibbles(q)


def encode_q4_1(values: np.ndarray, out: np.ndarray) -> None:
    x = values.astype(np.float32, copy=False)
    hi, lo = x.max(axis=-1, keepdims=True), x.min(axis=-1, keepdims=True)
    d = (hi - lo) / 15
    q = np.trunc((x - lo) * inverse(d) + np.float32(0.5), dtype=np.float32)
    q = q.astype(np.uint8).clip(0, 15)
    store_f16(out, 0, d)
    store_f16(out, 2, lo)
    out[:, 4:] = pack_nibbles(q)


def encode_q5_0(values: np.ndarray, out: np.ndarray) -> None:
    x = values.astype(np.float32, copy=False)
    d = abs_max_signed(x) / -16
    q = np.trunc(x * inverse(d) + np.float32(16.5), dtype=np.float32)
    q = q.astype(np.uint8).clip(0, 31)
    store_f16(out, 0, d)
    out[:, 2:6] = pack_high_bits(q)
    out[:, 6:] = pack_nibbles(q)


def encode_q5_1(values: np.ndarray, out: np.ndarray) -> None:
    x = values.astype(np.float32, copy=False)
    hi, lo = x.max(axis=-1, keepdims=True), x.min(axis=-1, keepdims=True)
    d = (hi - lo) / 31
    q = np.trunc((x - lo) * inverse(d) + np.float32(0.5), dtype=np.float32)
    q = q.astype(np.uint8).clip(0, 31)
    store_f16(out, 0, d)
    store_f16(out, 2, lo)
    out[:, 4:8] = pack_high_bits(q)
    out[:, 8:] = pack_nibbles(q)


def encode_q8_0(values: np.ndarray, out: np.ndarray) -> None:
    x = values.astype(np.float32, copy=False)
    d = np.abs(x).max(axis=-1, keepdims=True) / 127
    q = round_half_away(x * inverse(d))
    store_f16(out, 0, d)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)


DECODERS = {
    GGMLType.Q4_0: decode_q4_0,
    GGMLType.Q4_1: decode_q4_1,
    GGMLType.Q5_0: decode_q5_0,
    GGMLType.Q5_1: decode_q5_1,
    GGMLType.Q8_0: decode_q8_0,
}

ENCODERS = {
    GGMLType.Q4_0: encode_q4_0,
    GGMLType.Q4_1: encode_q4_1,
    GGMLType.Q5_0: encode_q5_0,
    GGMLType.Q5_1: encode_q5_1,
    GGMLType.Q8_0: encode_q8_0,
}
