"""GGML block formats: decode to float32 and encode from floats.

Decoding and the legacy encoders are bit-identical to gguf.quants (the
reference Python port of ggml's formats), vectorized per format and run in
chunks of blocks, so temporaries stay small whatever the tensor size. The
K-quant and IQ4 encoders, and the legacy ones given an importance matrix,
write the same bytes as llama.cpp's `ggml_quantize_chunk` (numba ports of
ggml-quants.c: search.py, kencode.py, iencode.py, compiled on first use).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from math import prod
from pathlib import Path
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
# Encoded by the numba kernels of rows.py: always, or (WEIGHTED) only given an importance matrix.
ROW_ENCODED = frozenset({
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
    GGMLType.IQ4_NL, GGMLType.IQ4_XS,
})
WEIGHTED = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1})

SUPPORTED_DEQUANT: frozenset[GGMLType] = frozenset(DECODERS)
SUPPORTED_QUANT: frozenset[GGMLType] = frozenset(ENCODERS) | ROW_ENCODED
QUANT_TABLE = dict.fromkeys(SUPPORTED_QUANT)  # for lookup(): the types, not their codecs

# Weights handled per step: 64K float32 = 256 KB of output, small enough
# that the few temporaries per step stay in cache, large enough that the
# per-step Python overhead is negligible.
CHUNK_WEIGHTS = 1 << 16
# Weights per call of the row encoders: their work per weight dwarfs the call, and a float32 copy
# of this many stays small (4 MiB).
ROW_CHUNK_WEIGHTS = 1 << 20


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


def quantize(
    x: np.ndarray, qtype: int | GGMLType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Encode x (last dim = row) into uint8 of shape x.shape[:-1] + (row_bytes,).

    imatrix: optional importance weights, one per column (the same for every row), as
    llama-quantize passes them; Q8_0 and the float types ignore them, as llama.cpp does.
    Quantized types refuse NaN/inf weights. The K-quant and IQ4 encoders run on numba's threads
    (numba.set_num_threads caps them); the bytes do not depend on the thread count.
    """
    qtype = lookup(qtype, QUANT_TABLE, "quantize")[0]
    x = np.asarray(x)
    if x.ndim == 0:
        raise PurelmError(f"{qtype.name}: cannot quantize a 0-d array")
    check_row_length(qtype, x.shape[-1])
    block, size = BLOCK_INFO[qtype]
    if imatrix is not None:
        imatrix = check_imatrix(qtype, imatrix, x.shape[-1])
    if block > 1:
        check_finite(qtype, x)
    if x.size == 0:
        return np.empty(x.shape[:-1] + (row_bytes(qtype, x.shape[-1]),), dtype=np.uint8)
    if qtype in ROW_ENCODED or (qtype in WEIGHTED and imatrix is not None):
        return encode_rows(qtype, x, imatrix)
    n_blocks = x.size // block
    out = np.empty((n_blocks, size), dtype=np.uint8)
    # Scales beyond f16 range become inf as in llama.cpp (a huge input's own doing); no warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        run_chunks(ENCODERS[qtype], x.reshape(n_blocks, block), out, block)
    return out.reshape(x.shape[:-1] + (row_bytes(qtype, x.shape[-1]),))


def check_imatrix(qtype: GGMLType, imatrix: object, n_cols: int) -> np.ndarray:
    """The importance matrix as a float32 vector of n_cols finite, non-negative weights."""
    w = np.asarray(imatrix)
    if w.dtype.kind not in "fiu":
        raise PurelmError(f"{qtype.name}: imatrix must be numbers, got {w.dtype}")
    if w.shape != (n_cols,):
        raise PurelmError(
            f"{qtype.name}: imatrix has shape {w.shape}, expected ({n_cols},): one weight per column"
        )
    w = w.astype(np.float32)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PurelmError(f"{qtype.name}: imatrix weight {i} is {w[i]} (must be finite and >= 0)")
    return w


def check_finite(qtype: GGMLType, x: np.ndarray) -> None:
    """PurelmError naming the first weight that is NaN/inf as float32 (the encoders compute in
    float32), checked a chunk at a time: no big temporary."""
    if x.dtype.kind not in "fiub":
        raise PurelmError(f"{qtype.name}: cannot quantize values of type {x.dtype}")
    if x.size == 0 or x.dtype.kind != "f":
        return
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, ROW_CHUNK_WEIGHTS // rows.shape[1])
    for start in range(0, len(rows), step):
        with np.errstate(over="ignore"):
            part = rows[start:start + step].astype(np.float32, copy=False)
        if not np.isfinite(part).all():
            r, c = np.argwhere(~np.isfinite(part))[0]
            raise PurelmError(
                f"{qtype.name}: cannot quantize non-finite value {rows[start + r, c]} "
                f"(row {start + int(r)}, column {int(c)})"
            )


# The modules of the numba encoders: a change to any of them must recompile them all.
KERNEL_SOURCES = ("search.py", "kencode.py", "iencode.py", "rows.py")


def kernels() -> Callable[..., None]:
    """rows.encode, its kernels compiled on first use (numba, cached: see paths.numba_cache)."""
    import sys

    if "purelm.quant.rows" in sys.modules:
        return sys.modules["purelm.quant.rows"].encode
    from ..paths import numba_cache

    with numba_cache("encoders", (Path(__file__).parent / f for f in KERNEL_SOURCES)):
        from .rows import encode
    return encode


def encode_rows(qtype: GGMLType, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """The numba encoders (rows.py), on float32 copies of up to ROW_CHUNK_WEIGHTS weights at a
    time, as many at once as numba has threads (they release the GIL)."""
    import numba

    encode = kernels()
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = np.empty((len(rows), row_bytes(qtype, n)), dtype=np.uint8)
    has_qw = imatrix is not None
    qw = imatrix if has_qw else np.zeros(1, np.float32)
    threads = numba.get_num_threads()
    step = max(1, min(ROW_CHUNK_WEIGHTS // n, -(-len(rows) // threads)))

    def run(start: int) -> None:
        part = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        encode(qtype, part, qw, has_qw, out[start:start + step])

    starts = range(0, len(rows), step)
    if threads == 1 or len(starts) == 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))  # list(): re-raises a worker's exception
    return out.reshape(x.shape[:-1] + (out.shape[1],))
