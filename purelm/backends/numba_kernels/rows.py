"""Kernels over the file's own row layout: rows of GGUF blocks, read straight from the mmap.

Used for embedding lookups (decode only the asked rows), for the zero-copy mode (repack=False), for
float matrices (F32/F16/BF16 need no repacking: a row is already a contiguous vector) and to
dequantize tiles of rows for BLAS. Numerics follow purelm.quant's decoders (scale, then offset), so
dequantized rows agree with them to the last bit or one rounding (where a multiply-add is fused).

`decode_row` handles one type per call with a branch outside the hot loops. Inner trip counts derive
from `block`, a runtime argument, never from literals (see packed.py for why).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...quant.types import GGMLType
from .common import OPTS, PARALLEL, at
from .intrinsics import bits_to_float, load_f16, load_f32, prefetch, wide_vectors

F32, F16, BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                int(GGMLType.Q5_1), int(GGMLType.Q8_0))
Q4_K, Q5_K, Q6_K = int(GGMLType.Q4_K), int(GGMLType.Q5_K), int(GGMLType.Q6_K)
ROWS_PER_ITEM = 8  # rows per parallel work item in matvec_rows
ROW_TYPES = frozenset(GGMLType(t) for t in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K))


@njit(**OPTS, inline="always")
def k_scale_min(scales, o, j):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block j from the 12 bytes at scales[o:]."""
    if j < 4:
        return np.float32(scales[o + j] & 63), np.float32(scales[o + j + 4] & 63)
    sc = (scales[o + j + 4] & 15) | ((scales[o + j - 4] >> 6) << 4)
    mn = (scales[o + j + 4] >> 4) | ((scales[o + j] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(**OPTS)
def decode_row(w, qtype, block, out):
    """Dequantize one row: w (row_bytes,) uint8 -> out (n_in,) float32. `block` is the type's
    weights per block, passed at runtime."""
    wide_vectors()
    n = out.shape[0]
    if qtype == F32:
        for k in range(n):
            out[k] = load_f32(w, 4 * k)
    elif qtype == F16:
        for k in range(n):
            out[k] = load_f16(w, 2 * k)
    elif qtype == BF16:
        for k in range(n):
            out[k] = bits_to_float(np.uint32(w[at(2 * k)]) << 16 | np.uint32(w[at(2 * k + 1)]) << 24)
    elif qtype == Q4_0 or qtype == Q4_1 or qtype == Q5_0 or qtype == Q5_1:
        half = block // 2
        has_min = qtype == Q4_1 or qtype == Q5_1
        high = qtype == Q5_0 or qtype == Q5_1
        size = 2 + 2 * has_min + 4 * high + half
        first = 4 if has_min else 2
        offset = np.float32(0 if has_min else (-16 if high else -8))
        for b in range(n // block):
            o = b * size
            d = load_f16(w, o)
            m = load_f16(w, o + 2) if has_min else np.float32(0)
            qh = np.uint32(0)
            if high:
                qh = (np.uint32(w[o + first]) | np.uint32(w[o + first + 1]) << 8
                      | np.uint32(w[o + first + 2]) << 16 | np.uint32(w[o + first + 3]) << 24)
            qo = o + first + 4 * high
            lo_at, hi_at = b * block, b * block + half
            for j in range(half):
                q = np.int32(w[at(qo + j)])
                lo = np.int32(q & 15)
                hi = np.int32(q >> 4)
                if high:
                    lo = np.int32(lo | (np.int32(qh >> j) & 1) << 4)
                    hi = np.int32(hi | (np.int32(qh >> (j + half)) & 1) << 4)
                if has_min:
                    out[at(lo_at + j)] = d * np.float32(lo) + m
                    out[at(hi_at + j)] = d * np.float32(hi) + m
                else:
                    out[at(lo_at + j)] = (np.float32(lo) + offset) * d
                    out[at(hi_at + j)] = (np.float32(hi) + offset) * d
    elif qtype == Q8_0:
        size = block + 2
        for b in range(n // block):
            o = b * size
            d = load_f16(w, o)
            for j in range(block):
                out[at(b * block + j)] = np.float32(np.int8(w[at(o + 2 + j)])) * d
    elif qtype == Q4_K or qtype == Q5_K:
        high = qtype == Q5_K
        size = 176 if high else 144
        sub = block // 8  # 32
        first = 48 if high else 16
        for b in range(n // block):
            o = b * size
            d = load_f16(w, o)
            dmin = load_f16(w, o + 2)
            for pair in range(4):
                sc0, mn0 = k_scale_min(w, o + 4, 2 * pair)
                sc1, mn1 = k_scale_min(w, o + 4, 2 * pair + 1)
                d0, m0 = d * sc0, dmin * mn0
                d1, m1 = d * sc1, dmin * mn1
                qo = o + first + pair * sub
                lo_at = b * block + pair * 2 * sub
                hi_at = lo_at + sub
                for l in range(sub):
                    q = np.int32(w[at(qo + l)])
                    lo = np.int32(q & 15)
                    hi = np.int32(q >> 4)
                    if high:
                        h = np.int32(w[at(o + 16 + l)])
                        lo = np.int32(lo | ((h >> (2 * pair)) & 1) << 4)
                        hi = np.int32(hi | ((h >> (2 * pair + 1)) & 1) << 4)
                    out[at(lo_at + l)] = d0 * np.float32(lo) - m0
                    out[at(hi_at + l)] = d1 * np.float32(hi) - m1
    elif qtype == Q6_K:
        size = 210
        quarter = block // 8  # 32
        for b in range(n // block):
            o = b * size
            d = load_f16(w, o + 208)
            for half in range(2):
                ql = o + 64 * half
                qh = o + 128 + 32 * half
                sc = o + 192 + 8 * half
                base = b * block + 128 * half
                for part in range(2):  # l in [0, 16) and [16, 32): one scale each
                    d1 = d * np.float32(np.int8(w[sc + part]))
                    d2 = d * np.float32(np.int8(w[sc + part + 2]))
                    d3 = d * np.float32(np.int8(w[sc + part + 4]))
                    d4 = d * np.float32(np.int8(w[sc + part + 6]))
                    l0 = part * (quarter // 2)
                    for i in range(quarter // 2):
                        l = l0 + i
                        a = np.int32(w[at(ql + l)])
                        c = np.int32(w[at(ql + quarter + l)])
                        h = np.int32(w[at(qh + l)])
                        q1 = np.int32(((a & 15) | ((h & 3) << 4)) - 32)
                        q2 = np.int32(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                        q3 = np.int32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                        q4 = np.int32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)
                        out[at(base + l)] = d1 * np.float32(q1)
                        out[at(base + quarter + l)] = d2 * np.float32(q2)
                        out[at(base + 2 * quarter + l)] = d3 * np.float32(q3)
                        out[at(base + 3 * quarter + l)] = d4 * np.float32(q4)


_decode_row_inline = njit(**OPTS, inline="always")(decode_row.py_func)


def _lookup_of(qtype: int):
    """dequant_rows' kernel for `qtype`, a constant of the compiled function (its closure: numba keys
    the cache by closure values too), so that only that type's branch of decode_row is compiled."""
    def lookup(data, block, rows, out):
        for i in range(rows.shape[0]):
            _decode_row_inline(data[rows[i]], qtype, block, out[i])
    return njit(**OPTS)(lookup)


# Defined with the module, not on first use: numba picks a cached function's folder when the function
# is defined (purelm.paths.numba_cache), and compiles it only when it is first called.
_LOOKUPS = {int(t): _lookup_of(int(t)) for t in sorted(ROW_TYPES)}


def dequant_rows(qtype: int):
    """The embedding lookup of one type: f(data, block, rows, out) sets out[i] = row rows[i] of data
    (n_rows, row_bytes), dequantized. A kernel per type: a first start compiles the embeddings' type
    only, not every type's branches (benchmarks/README.md, "First start")."""
    lookup = _LOOKUPS.get(qtype)
    if lookup is None:
        raise ValueError(f"dequant_rows: no row kernel for type {qtype}")
    return lookup


@njit(**OPTS)
def dequant_range(data, qtype, block, r0, out):
    """out[i] = row r0 + i of data, dequantized (a tile for BLAS, on the caller's thread)."""
    for i in range(out.shape[0]):
        decode_row(data[r0 + i], qtype, block, out[i])


@njit(**PARALLEL)
def matvec_rows(data, qtype, block, x, y):
    """y (T, n_out) = x (T, n_in) @ W.T for W in file layout. Float rows are dotted in place;
    quantized rows are decoded into a buffer first (one per run of ROWS_PER_ITEM rows)."""
    n_out, row_bytes = data.shape
    n_tok, n_in = x.shape
    flat = data.reshape(-1)
    floats = qtype == F32 or qtype == F16 or qtype == BF16
    n_items = -(-n_out // ROWS_PER_ITEM)
    for item in prange(n_items):
        wide_vectors()
        buf = np.empty(0 if floats else n_in, np.float32)
        for row in range(item * ROWS_PER_ITEM, min(n_out, (item + 1) * ROWS_PER_ITEM)):
            w = data[row]
            for c in range(0, row_bytes, 64):
                prefetch(flat, (row + 1) * row_bytes + c)
            if floats:
                for t in range(n_tok):
                    s = np.float32(0)
                    if qtype == F32:
                        for k in range(n_in):
                            s += load_f32(w, 4 * k) * x[t, k]
                    elif qtype == F16:
                        for k in range(n_in):
                            s += load_f16(w, 2 * k) * x[t, k]
                    else:
                        for k in range(n_in):
                            bits = np.uint32(w[at(2 * k)]) << 16 | np.uint32(w[at(2 * k + 1)]) << 24
                            s += bits_to_float(bits) * x[t, k]
                    y[t, row] = s
            else:
                decode_row(w, qtype, block, buf)
                for t in range(n_tok):
                    s = np.float32(0)
                    for k in range(n_in):
                        s += buf[k] * x[t, k]
                    y[t, row] = s
