"""Plain float formats: F32, F16, BF16 (one weight per "block").

Decoders take `blocks` (n, bytes_per_weight) uint8 and write float32 into
`out` (n, 1). Encoders take values (n, 1) of any float dtype and write bytes
into `out` (n, bytes_per_weight). Rounding follows gguf.quants exactly.
"""
from __future__ import annotations

import numpy as np

from .types import GGMLType


def decode_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float32)


def decode_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float16)


def decode_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    # bf16 is the top half of an f32: widen the bits, no rounding involved.
    out.view(np.uint32)[...] = blocks.view(np.uint16).astype(np.uint32) << 16


def encode_f32(values: np.ndarray, out: np.ndarray) -> None:
    out.view(np.float32)[...] = values


def encode_f16(values: np.ndarray, out: np.ndarray) -> None:
    # Convert straight from the input dtype (as gguf does): going through
    # float32 first would round twice for float64 input.
    out.view(np.float16)[...] = values.astype(np.float16, copy=False)


def encode_bf16(values: np.ndarray, out: np.ndarray) -> None:
    # ggml_compute_fp32_to_bf16: quiet NaNs, then round to nearest even.
    # uint32 cannot overflow here: the largest non-NaN pattern (-inf,
    # 0xff800000) and quieted NaNs (low half zero) plus 0x8000 still fit.
    n = values.astype(np.float32, copy=False).view(np.uint32)
    is_nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    n = np.where(is_nan, (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
    n = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out.view(np.uint16)[...] = n


DECODERS = {
    GGMLType.F32: decode_f32,
    GGMLType.F16: decode_f16,
    GGMLType.BF16: decode_bf16,
}

ENCODERS = {
    GGMLType.F32: encode_f32,
    GGMLType.F16: encode_f16,
    GGMLType.BF16: encode_bf16,
}
