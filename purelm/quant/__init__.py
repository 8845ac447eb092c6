"""GGML block formats: decode to float32 and encode from floats.

Results are bit-identical to gguf.quants (the reference Python port of
ggml's formats). Work is vectorized per format and done in chunks of blocks,
so temporaries stay small (and in cache) whatever the tensor size.
"""
from __future__ import annotations

from math import prod
from typing import Callable

import numpy as np

from ..errors import PurelmError
from . import floats, iquants, kquants, legacy
from .types import BLOCK_INFO, GGMLType, row_bytes, type_name

__all__ = [
    "GGMLType",
    "SUPPORTED_DEQUANT",
    "SUPPORTED_QUANT",
    "dequantize",
    "dequantize_rows",
    "quantize",
]

Codec = Callable[[np.ndarray, np.ndarray], None]

DECODERS: dict[GGMLType, Codec] = {
    **floats.DECODERS, **legacy.DECODERS, **kquants.DECODERS, **iquants.DECODERS,
}
ENCODERS: dict[GGMLType, Codec] = {**floats.ENCODERS, **legacy.ENCODERS}

SUPPORTED_DEQUANT: frozenset[GGMLType] = frozenset(DECODERS)
SUPPORTED_QUANT: frozenset[GGMLType] = frozenset(ENCODERS)

# Weights handled per step: 64K float32 = 256 KB of output, small enough
# that the few temporaries per step stay in cache, large enough that the
# per-step Python overhead is negligible.
CHUNK_WEIGHTS = 1 << 16


def lookup(qtype: object, table: dict[GGMLType, Codec], action: str) -> tuple[GGMLType, Codec]:
    """The GGMLType for a type id and its codec, or PurelmError naming the type."""
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        name = type_name(int(qtype)) if isinstance(qtype, (int, np.integer)) else repr(qtype)
        raise PurelmError(f"cannot {action}: unknown tensor type {name}") from None
    if qtype not in table:
        supported = ", ".join(t.name for t in sorted(table))
        raise PurelmError(f"cannot {action} tensor type {qtype.name} (supported: {supported})")
    return qtype, table[qtype]


def check_row_length(qtype: GGMLType, n: int) -> None:
    block = BLOCK_INFO[qtype][0]
    if n % block:
        raise PurelmError(
            f"{qtype.name}: row length {n} is not a multiple of the block size {block}"
        )


def byte_view(data: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """The raw bytes of `data` as uint8 (a view whenever possible, never written)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype == np.uint8:
        return data
    if data.ndim == 0 or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data).reshape(-1)
    return data.view(np.uint8)


def run_chunks(codec: Codec, src: np.ndarray, out: np.ndarray, block: int) -> None:
    """Apply codec to matching block ranges of src and out (both 2-D, one block a row).

    The out slices are C-contiguous, so codecs may reshape them in place.
    """
    step = max(1, CHUNK_WEIGHTS // block)
    for start in range(0, len(src), step):
        codec(src[start:start + step], out[start:start + step])


def dequantize(
    data: np.ndarray, qtype: int | GGMLType, shape: tuple[int, ...]
) -> np.ndarray:
    """Decode raw tensor bytes into a new float32 array of `shape`.

    `data` holds the bytes in file order (1-D, or rows x row_bytes, any
    dtype is taken as its raw bytes); the last dim of `shape` is the row.
    """
    qtype, decode = lookup(qtype, DECODERS, "dequantize")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise PurelmError(f"{qtype.name}: shape must have at least one dimension")
    check_row_length(qtype, shape[-1])
    block, size = BLOCK_INFO[qtype]
    n_blocks = prod(shape) // block
    raw = byte_view(data)
    if raw.size != n_blocks * size:
        raise PurelmError(
            f"{qtype.name}: shape {shape} needs {n_blocks * size} bytes, got {raw.size}"
        )
    out = np.empty((n_blocks, block), dtype=np.float32)
    # Corrupt scales (inf/NaN) decode faithfully to inf/NaN; no warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        run_chunks(decode, raw.reshape(n_blocks, size), out, block)
    return out.reshape(shape)


def dequantize_rows(
    data: np.ndarray, qtype: int | GGMLType, n_cols: int, rows: np.ndarray
) -> np.ndarray:
    """Decode only the given rows of a 2-D tensor (e.g. an embedding lookup).

    `data` is rows x row_bytes (or the same bytes flat); returns float32 of
    shape rows.shape + (n_cols,), i.e. (len(rows), n_cols) for 1-D rows.
    """
    qtype, _ = lookup(qtype, DECODERS, "dequantize")
    n_cols = int(n_cols)
    check_row_length(qtype, n_cols)
    width = row_bytes(qtype, n_cols)
    raw = byte_view(data)
    if width == 0 or raw.size % width:
        raise PurelmError(
            f"{qtype.name}: {raw.size} bytes is not a whole number of rows "
            f"of {n_cols} weights ({width} bytes each)"
        )
    table = raw.reshape(-1, width)
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise PurelmError(f"row indices must be integers, got {rows.dtype}")
    if rows.size and (rows.min() < 0 or rows.max() >= len(table)):
        raise PurelmError(f"row index out of range 0..{len(table) - 1}")
    picked = table[rows.reshape(-1)]  # copies only the asked rows
    return dequantize(picked, qtype, (rows.size, n_cols)).reshape(rows.shape + (n_cols,))


def quantize(x: np.ndarray, qtype: int | GGMLType) -> np.ndarray:
    """Encode x (last dim = row) into uint8 of shape x.shape[:-1] + (row_bytes,)."""
    qtype, encode = lookup(qtype, ENCODERS, "quantize")
    x = np.asarray(x)
    if x.ndim == 0:
        raise PurelmError(f"{qtype.name}: cannot quantize a 0-d array")
    check_row_length(qtype, x.shape[-1])
    block, size = BLOCK_INFO[qtype]
    n_blocks = x.size // block
    out = np.empty((n_blocks, size), dtype=np.uint8)
    run_chunks(encode, x.reshape(n_blocks, block), out, block)
    return out.reshape(x.shape[:-1] + (row_bytes(qtype, x.shape[-1]),))
