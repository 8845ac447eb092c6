"""Non-linear 4-bit blocks: IQ4_NL (32 weights) and IQ4_XS (256), decode only.

Each 4-bit code indexes a fixed table of 16 levels (kvalues_iq4nl in
ggml-common.h) that is then scaled, `d * level`, exactly as gguf.quants does.
"""
from __future__ import annotations

import numpy as np

from .legacy import f16_field, unpack_nibbles
from .types import GGMLType

LEVELS = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
    dtype=np.float32,
)


def decode_iq4_nl(blocks: np.ndarray, out: np.ndarray) -> None:
    # d | qs[16]: low nibbles are weights 0..15, high nibbles 16..31
    q = np.empty(out.shape, np.uint8)
    unpack_nibbles(blocks[:, 2:], q)
    np.take(LEVELS, q, out=out, mode="clip")  # codes are < 16 anyway
    out *= f16_field(blocks, 0)


def decode_iq4_xs(blocks: np.ndarray, out: np.ndarray) -> None:
    # d | scales_h (uint16, 2 bits per group) | scales_l[4] (4 bits per group)
    #   | qs[128]: 8 groups of 32 weights, 16 bytes each, nibbles as IQ4_NL
    n = len(blocks)
    low = (blocks[:, 4:8, None] >> np.array([0, 4], np.uint8)) & np.uint8(0x0F)
    high = blocks[:, 2:4].view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)
    high = high.astype(np.uint8) & np.uint8(0x03)
    scales = (low.reshape(n, 8) | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = f16_field(blocks, 0) * scales.astype(np.float32)

    q = np.empty((n * 8, 32), np.uint8)
    unpack_nibbles(blocks[:, 8:].reshape(n * 8, 16), q)
    np.take(LEVELS, q.reshape(n, 8, 32), out=out.reshape(n, 8, 32), mode="clip")
    groups = out.reshape(n, 8, 32)
    groups *= dl[:, :, None]


DECODERS = {
    GGMLType.IQ4_NL: decode_iq4_nl,
    GGMLType.IQ4_XS: decode_iq4_xs,
}
