"""Kernels over repacked matrices (see packing.py): y = x @ W.T for a few rows of x (decode), and
dequantizing groups of rows to float32 (prefill hands the tile to BLAS).

The lane loop `for r in range(R)` is innermost everywhere, with R read from an array shape: LLVM then
vectorizes it over rows. Trip counts of the other loops also come from shapes, never literals (a
literal count gets the loop fully unrolled and vectorized the wrong way: 2x slower in a row kernel).
Integer arithmetic is narrowed to int32 before conversion, or numba widens it to int64 and halves
the vector width.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import OPTS, PARALLEL, PREFETCH_BYTES, at
from .intrinsics import (BYTE_QUADS, CRUMB_KIND, CRUMB3_KIND, FIVE_QUADS, IQ4_LEVELS, LEVEL_KIND, NIBBLE_QUADS, SIX_QUADS,
                         add_scaled16, add_scaled_dots16, dot_block1, dot_block2, dot_block4, half_to_float, prefetch,
                         wide_vectors)
from .packing import BYTES, LEVELS, LEVELS_K, SIX, THREE, TWO



@njit(**OPTS)
def sub_block_sums(x, width):
    """Sums of x over consecutive runs of `width` columns: (T, n_in) -> (T, n_in // width)."""
    n_tok, n_in = x.shape
    out = np.empty((n_tok, n_in // width), np.float32)
    for t in range(n_tok):
        for b in range(n_in // width):
            s = np.float32(0)
            for j in range(width):
                s += x[t, b * width + j]
            out[t, b] = s
    return out


@njit(**OPTS, inline="always")
def five_bit_pair(q, h, j, half):
    """The 5-bit values of weights j and j + half: byte q's low and high nibble, bit 4 from bits j and
    j + half of h. Every step truncated to 32 bits: numba computes integers in 64 bits, and LLVM only
    narrows them back where it can prove the upper half unused (64-bit lanes made the Q5 kernels
    2-3x slower than Q4's, measured)."""
    mask_lo = np.uint32(np.uint32(1) << np.uint32(j))  # loop-invariant in the callers' lane loops
    mask_hi = np.uint32(np.uint32(1) << np.uint32(j + half))
    q32 = np.int32(q)
    lo = np.int32(np.int32(q32 & np.int32(15)) | (np.int32(16) if np.uint32(h & mask_lo) else np.int32(0)))
    hi = np.int32(np.int32(q32 >> np.int32(4)) | (np.int32(16) if np.uint32(h & mask_hi) else np.int32(0)))
    return lo, hi


@njit(**OPTS, inline="always")
def six_bit_quad(a, c, h):
    """Q6_K's 6-bit values (0..63) of weights j, j+8, j+16, j+24 of a sub-block from its nibble bytes
    a (weights j, j+16) and c (j+8, j+24) and its high-bit byte h; 32-bit steps, as in five_bit_pair."""
    a32, c32, h32 = np.int32(a), np.int32(c), np.int32(h)
    w0 = np.int32(np.int32(a32 & np.int32(15)) | np.int32(np.int32(h32 & np.int32(3)) << np.int32(4)))
    w1 = np.int32(np.int32(c32 & np.int32(15)) | np.int32(np.int32(h32 & np.int32(12)) << np.int32(2)))
    w2 = np.int32(np.int32(a32 >> np.int32(4)) | np.int32(h32 & np.int32(48)))
    w3 = np.int32(np.int32(c32 >> np.int32(4)) | np.int32(np.int32(h32 >> np.int32(2)) & np.int32(48)))
    return w0, w1, w2, w3


@njit(**OPTS, inline="always")
def nibble_fold(acc, s, d, m, sc, mn, mode, offset, g, b, xs, t, n_lanes):
    """acc[t] += the sub-block's contribution, from raw sums s[r] = sum_j q[j, r] * x[j]."""
    if mode == 0:
        for r in range(n_lanes):
            acc[t, r] += half_to_float(d[g, b, r]) * (s[r] + offset * xs)
    elif mode == 1:
        for r in range(n_lanes):
            acc[t, r] += half_to_float(d[g, b, r]) * s[r] + half_to_float(m[g, b, r]) * xs
    else:
        sb = b // 8
        for r in range(n_lanes):
            acc[t, r] += (half_to_float(d[g, sb, r]) * np.float32(sc[g, b, r]) * s[r]
                          - half_to_float(m[g, sb, r]) * np.float32(mn[g, b, r]) * xs)


@njit(**OPTS, inline="always")
def split_range(item, n_split, n_sub):
    """Work item -> (group, split, first sub-block, end sub-block)."""
    g, k = item // n_split, item % n_split
    return g, k, k * n_sub // n_split, (k + 1) * n_sub // n_split


@njit(**OPTS, inline="always")
def store_group(acc, y, parts, g, k, n_lanes, t_lo, t_hi):
    """A work item's sums of tokens t_lo..t_hi-1: straight into y, or into its split's slot of `parts`
    (summed later)."""
    n_out = y.shape[1]
    if parts.shape[0] == 0:
        for t in range(t_lo, t_hi):
            for r in range(min(n_lanes, n_out - g * n_lanes)):
                y[t, at(g * n_lanes + r)] = acc[t, r]
    else:
        for t in range(t_lo, t_hi):
            for r in range(n_lanes):
                parts[k, t, at(g * n_lanes + r)] = acc[t, r]


@njit(**OPTS, inline="always")
def token_splits(parts):
    """The ranges the dot kernels cut a batch's tokens into: `parts` of shape (0, n, c) asks for n
    (a prompt's rows: work items over row groups and token ranges need no sums of column ranges
    added up afterwards, a serial step), any other `parts` for one."""
    return max(1, parts.shape[1]) if parts.shape[0] == 0 else 1


@njit(**OPTS, inline="always")
def column_ranges(parts):
    """With token ranges (parts of shape (0, n, c)): the c column ranges a batch item sums one after
    another, as the column splits of the same matrix are summed (sum_parts), so that each token's
    sums have the bits they have in a decode step."""
    return max(1, parts.shape[2]) if parts.shape[0] == 0 else 1


@njit(**OPTS, inline="always")
def token_range(item, n_ranges, n_tok):
    """Work item -> (its item over row groups and column splits, first token, end token)."""
    k = item % n_ranges
    return item // n_ranges, k * n_tok // n_ranges, (k + 1) * n_tok // n_ranges


@njit(**OPTS, inline="always")
def sum_parts(y, parts):
    n_tok, n_out = y.shape
    for t in range(n_tok):
        for i in range(n_out):
            total = np.float32(0)
            for k in range(parts.shape[0]):
                total += parts[k, t, i]
            y[t, i] = total


# The matrix-vector kernels: y (T, n_out) = x (T, n_in) @ W.T. Work items are groups of R rows, or,
# when there are too few groups to keep every thread busy, (group, column range) pairs: `parts`
# (n_split, T, n_groups * R) then holds each range's sums. An empty `parts` means one range.

@njit(**PARALLEL)
def matvec_nibble(qs, qh, d, m, sc, mn, mode, offset, x, y, parts):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K."""
    n_groups, n_sub, half, n_lanes = qs.shape
    n_tok = x.shape[0]
    n_split = max(1, parts.shape[0])
    high = qh.shape[1] > 0
    xsum = sub_block_sums(x, 2 * half)
    flat = qs.reshape(-1)
    step = n_sub * half * n_lanes
    for item in prange(n_groups * n_split):
        wide_vectors()
        g, k, b0, b1 = split_range(item, n_split, n_sub)
        acc = np.zeros((n_tok, n_lanes), np.float32)
        s = np.empty((n_tok, n_lanes), np.float32)
        for b in range(b0, b1):
            at = g * step + b * half * n_lanes
            for c in range(0, half * n_lanes, 64):
                prefetch(flat, at + PREFETCH_BYTES + c)
            x0 = b * 2 * half
            s[:] = 0
            # token by token, converting the weights again for each: a row's sums are then the same
            # whatever other rows share the call (converting a column once for all tokens was no faster
            # at 8 tokens, and its sums rounded differently)
            for t in range(n_tok):
                if high:
                    for j in range(half):
                        xl = x[t, x0 + j]
                        xh = x[t, x0 + half + j]
                        for r in range(n_lanes):
                            lo, hi = five_bit_pair(qs[g, b, j, r], qh[g, b, r], j, half)
                            s[t, r] += np.float32(lo) * xl + np.float32(hi) * xh
                else:
                    for j in range(half):
                        xl = x[t, x0 + j]
                        xh = x[t, x0 + half + j]
                        for r in range(n_lanes):
                            q = qs[g, b, j, r]
                            s[t, r] += np.float32(np.int32(q & 15)) * xl + np.float32(np.int32(q >> 4)) * xh
            for t in range(n_tok):
                nibble_fold(acc, s[t], d, m, sc, mn, mode, offset, g, b, xsum[t, b], t, n_lanes)
        store_group(acc, y, parts, g, k, n_lanes, 0, n_tok)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_q8(qs, d, x, y, parts):
    """Q8_0."""
    n_groups, n_blocks, width, n_lanes = qs.shape
    n_tok = x.shape[0]
    n_split = max(1, parts.shape[0])
    flat = qs.reshape(-1)
    step = n_blocks * width * n_lanes
    for item in prange(n_groups * n_split):
        wide_vectors()
        g, k, b0, b1 = split_range(item, n_split, n_blocks)
        acc = np.zeros((n_tok, n_lanes), np.float32)
        s = np.empty(n_lanes, np.float32)
        for b in range(b0, b1):
            at = g * step + b * width * n_lanes
            for c in range(0, width * n_lanes, 64):
                prefetch(flat, at + PREFETCH_BYTES + c)
            for t in range(n_tok):
                s[:] = 0
                x0 = b * width
                for j in range(width):
                    xj = x[t, x0 + j]
                    for r in range(n_lanes):
                        s[r] += np.float32(qs[g, b, j, r]) * xj
                for r in range(n_lanes):
                    acc[t, r] += half_to_float(d[g, b, r]) * s[r]
        store_group(acc, y, parts, g, k, n_lanes, 0, n_tok)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_q6k(qs, qh, sc, d, x, y, parts):
    """Q6_K. Weights j, j+8 of a 32-weight sub-block share scale sc[2k], weights j+16, j+24 sc[2k+1]."""
    n_groups, n_sub, half, n_lanes = qs.shape
    quarter = qh.shape[2]
    n_tok = x.shape[0]
    n_split = max(1, parts.shape[0])
    xsum = sub_block_sums(x, quarter * 2)  # per 16 weights
    flat = qs.reshape(-1)
    step = n_sub * half * n_lanes
    for item in prange(n_groups * n_split):
        wide_vectors()
        g, k, b0, b1 = split_range(item, n_split, n_sub)
        acc = np.zeros((n_tok, n_lanes), np.float32)
        sa = np.empty(n_lanes, np.float32)
        sb = np.empty(n_lanes, np.float32)
        for b in range(b0, b1):
            at = g * step + b * half * n_lanes
            for c in range(0, half * n_lanes, 64):
                prefetch(flat, at + PREFETCH_BYTES + c)
            for t in range(n_tok):
                sa[:] = 0
                sb[:] = 0
                x0 = b * 4 * quarter
                for j in range(quarter):
                    x_0 = x[t, x0 + j]
                    x_1 = x[t, x0 + quarter + j]
                    x_2 = x[t, x0 + 2 * quarter + j]
                    x_3 = x[t, x0 + 3 * quarter + j]
                    for r in range(n_lanes):
                        w0, w1, w2, w3 = six_bit_quad(qs[g, b, j, r], qs[g, b, j + quarter, r], qh[g, b, j, r])
                        sa[r] += np.float32(w0) * x_0 + np.float32(w1) * x_1
                        sb[r] += np.float32(w2) * x_2 + np.float32(w3) * x_3
                xa = xsum[t, 2 * b]
                xb = xsum[t, 2 * b + 1]
                sup = b // 8
                for r in range(n_lanes):
                    acc[t, r] += half_to_float(d[g, sup, r]) * (
                        np.float32(sc[g, 2 * b, r]) * (sa[r] - 32 * xa)
                        + np.float32(sc[g, 2 * b + 1, r]) * (sb[r] - 32 * xb))
        store_group(acc, y, parts, g, k, n_lanes, 0, n_tok)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


# -- dequantizing groups [g0, g1) into out (n_in, (g1 - g0) * R): column c is row g0 * R + c.
# Transposed so that the lane loop writes contiguous floats; BLAS takes the transpose for free.
# Serial: prefill runs them on its own threads, one tile each (see numba_backend).

@njit(**OPTS, inline="always")
def nibble_scales(d, m, sc, mn, mode, offset, g, b, scale, bias, n_lanes):
    """Sub-block b's weights of group g are scale[r] * q + bias[r] (q the 4- or 5-bit value)."""
    if mode == 0:
        for r in range(n_lanes):
            scale[r] = half_to_float(d[g, b, r])
            bias[r] = scale[r] * offset
    elif mode == 1:
        for r in range(n_lanes):
            scale[r] = half_to_float(d[g, b, r])
            bias[r] = half_to_float(m[g, b, r])
    else:
        sb = b // 8
        for r in range(n_lanes):
            scale[r] = half_to_float(d[g, sb, r]) * np.float32(sc[g, b, r])
            bias[r] = -(half_to_float(m[g, sb, r]) * np.float32(mn[g, b, r]))


@njit(**OPTS, inline="always")
def unpack_nibble_group(qs, qh, d, m, sc, mn, mode, offset, g, out, c0, scale, bias):
    n_groups, n_sub, half, n_lanes = qs.shape
    high = qh.shape[1] > 0
    for b in range(n_sub):
        x0 = b * 2 * half
        nibble_scales(d, m, sc, mn, mode, offset, g, b, scale, bias, n_lanes)
        if high:
            for j in range(half):
                for r in range(n_lanes):
                    lo, hi = five_bit_pair(qs[g, b, j, r], qh[g, b, r], j, half)
                    out[at(x0 + j), at(c0 + r)] = scale[r] * np.float32(lo) + bias[r]
                    out[at(x0 + half + j), at(c0 + r)] = scale[r] * np.float32(hi) + bias[r]
        else:
            for j in range(half):
                for r in range(n_lanes):
                    q = qs[g, b, j, r]
                    out[at(x0 + j), at(c0 + r)] = scale[r] * np.float32(np.int32(q & 15)) + bias[r]
                    out[at(x0 + half + j), at(c0 + r)] = scale[r] * np.float32(np.int32(q >> 4)) + bias[r]


@njit(**OPTS)
def unpack_nibble(qs, qh, d, m, sc, mn, mode, offset, g0, g1, out):
    n_lanes = qs.shape[3]
    scale = np.empty(n_lanes, np.float32)
    bias = np.empty(n_lanes, np.float32)
    wide_vectors()
    for gi in range(g1 - g0):
        unpack_nibble_group(qs, qh, d, m, sc, mn, mode, offset, g0 + gi, out, gi * n_lanes, scale, bias)


@njit(**OPTS, inline="always")
def unpack_q8_group(qs, d, g, out, c0):
    n_groups, n_blocks, width, n_lanes = qs.shape
    for b in range(n_blocks):
        for j in range(width):
            for r in range(n_lanes):
                out[at(b * width + j), at(c0 + r)] = half_to_float(d[g, b, r]) * np.float32(qs[g, b, j, r])


@njit(**OPTS)
def unpack_q8(qs, d, g0, g1, out):
    wide_vectors()
    for gi in range(g1 - g0):
        unpack_q8_group(qs, d, g0 + gi, out, gi * qs.shape[3])


@njit(**OPTS, inline="always")
def unpack_q6k_group(qs, qh, sc, d, g, out, c0):
    n_groups, n_sub, half, n_lanes = qs.shape
    quarter = qh.shape[2]
    for b in range(n_sub):
        x0 = b * 4 * quarter
        sup = b // 8
        for j in range(quarter):
            for r in range(n_lanes):
                w0, w1, w2, w3 = six_bit_quad(qs[g, b, j, r], qs[g, b, j + quarter, r], qh[g, b, j, r])
                dd = half_to_float(d[g, sup, r])
                da = dd * np.float32(sc[g, 2 * b, r])
                db = dd * np.float32(sc[g, 2 * b + 1, r])
                out[at(x0 + j), at(c0 + r)] = da * np.float32(w0 - 32)
                out[at(x0 + quarter + j), at(c0 + r)] = da * np.float32(w1 - 32)
                out[at(x0 + 2 * quarter + j), at(c0 + r)] = db * np.float32(w2 - 32)
                out[at(x0 + 3 * quarter + j), at(c0 + r)] = db * np.float32(w3 - 32)


@njit(**OPTS)
def unpack_q6k(qs, qh, sc, d, g0, g1, out):
    wide_vectors()
    for gi in range(g1 - g0):
        unpack_q6k_group(qs, qh, sc, d, g0 + gi, out, gi * qs.shape[3])


# -- the dot layouts (packing.py): activations quantized to int16 per 32 weights, products summed in
# int32 by integer multiply-adds (vpmaddwd), 4 weights of a row per 32-bit lane; the float scales are
# applied per sub-block.
# Against the float kernels: 1.3-1.7x the speed on one core (regress.py, 2048x2048), and the
# quantization moves a product by ~1e-4 of its largest value (emulated on SmolLM2: top-1 of 1200
# teacher-forced tokens unchanged, perplexity within 0.004%; int8 activations, as llama.cpp uses,
# changed 5% of the top-1 tokens there).

WORDS = 8  # int64 words (4 int16 activations each) per 32-weight sub-block
ACT_MAX = 32767  # int16 activations: x = dx * q, |q| <= ACT_MAX
ACT8_MAX = 127  # int8 activations (the int8 kernels negate them: -128 is never used)
FLOAT_MAX = np.float32(np.finfo(np.float32).max)
FLOAT64_MAX = np.finfo(np.float64).max
SMALLEST_SCALE = np.float32(1e-34)  # normal, and 1 / it fits a float32


@njit(**OPTS)
def round_activations(x, width, act_max, q):
    """x (T, n_in) -> q (T * n_in integers, |q| <= act_max) and per run of `width` values dx (its scale)
    and xq_sums (dx * the sum of q: the sum of the rounded x). A run holding inf or NaN gets a NaN
    scale, so the products it enters are NaN (as the reference's). Runs of values below ~1e-30 are
    rounded in float64: their scale is subnormal, and its float32 reciprocal would overflow."""
    n_tok, n_in = x.shape
    n_run = n_in // width
    dx = np.empty((n_tok, n_run), np.float32)
    xq_sums = np.empty((n_tok, n_run), np.float32)
    top = np.float32(act_max)
    for t in range(n_tok):
        for b in range(n_run):
            amax = np.float32(0)
            total = np.float64(0)  # only to see inf or NaN: float64, so that large finite runs do not overflow
            for j in range(width):
                v = x[t, b * width + j]
                amax = max(amax, abs(v))
                total += np.float64(v)
            scale = amax / top
            if not (abs(total) <= FLOAT64_MAX and amax <= FLOAT_MAX):  # (np.isfinite is folded away here)
                scale = np.float32(np.nan)
            qsum = np.int32(0)
            if scale >= SMALLEST_SCALE:  # finite values, and a float32 reciprocal that does not overflow
                inv = np.float32(1) / scale
                for j in range(width):
                    v = min(max(np.rint(x[t, b * width + j] * inv), -top), top)
                    q[t * n_in + b * width + j] = v
                    qsum += np.int32(v)
            else:  # zeros, tiny values (a subnormal scale), inf or NaN: in float64, NaN-safe
                inv64 = np.float64(1) / np.float64(scale) if scale > 0 else np.float64(0)
                for j in range(width):
                    v64 = np.rint(np.float64(x[t, b * width + j]) * inv64)
                    if not abs(v64) <= act_max:  # rounding at the edge, or NaN
                        v64 = 0.0 if v64 != v64 else np.sign(v64) * act_max
                    q[t * n_in + b * width + j] = v64
                    qsum += np.int32(v64)
            dx[t, b] = scale
            xq_sums[t, b] = scale * np.float32(qsum)
    return dx, xq_sums


@njit(**OPTS)
def quantize_activations(x, width, pairs):
    """x (T, n_in) -> (q, dx, xq_sums) for the int16 kernels: q int16 per `width` weights as int64 words
    of 4, (T, n_in // 4); dx and xq_sums as round_activations gives them. `pairs`: each word holds its
    four values in the order 0, 2, 1, 3 (pair_words)."""
    q = np.empty(x.shape[0] * x.shape[1], np.int16)
    dx, xq_sums = round_activations(x, width, ACT_MAX, q)
    if pairs:
        for i in range(0, q.shape[0], 4):
            q[i + 1], q[i + 2] = q[i + 2], q[i + 1]
    return q.view(np.int64).reshape(x.shape[0], x.shape[1] // 4), dx, xq_sums


@njit(**OPTS, inline="always")
def pair_words(kind):
    """Whether kind's int16 kernels take the activation words as pairs: values 0, 2 then 1, 3, the
    activations of the weights that meet in a multiply-add of neighbouring 16-bit lanes (the nibble
    layouts: intrinsics._nibble_dots), each pair an int32 that the kernel broadcasts as it loads it."""
    return kind == NIBBLE_QUADS or kind == FIVE_QUADS or kind == SIX_QUADS


@njit(**OPTS)
def quantize_activations8(x, width):
    """quantize_activations for the int8 kernels: q int8, as int32 words of 4."""
    q = np.empty(x.shape[0] * x.shape[1], np.int8)
    dx, xq_sums = round_activations(x, width, ACT8_MAX, q)
    return q.view(np.int32).reshape(x.shape[0], x.shape[1] // 4), dx, xq_sums


@njit(**OPTS, inline="always")
def fold_dots(int8, acc, t, dots, off, mode, dscale, mscale, s, xq_sums, b, offset, n_lanes):
    """One token's integer dots of one block (dots[off:], 16 rows at a time) into its float sums
    acc[t], with the block's scales; offsets and minimums multiply the sum of the same rounded x
    (xq_sums[t, b]; Q2_K: per 16 weights, [t, 2b] and [t, 2b + 1]) as the products. The int8 kernels'
    Q8_0 dots are of w + 128 (intrinsics.py)."""
    for v in range(0, n_lanes, 16):
        a = t * n_lanes + v
        add_scaled_dots16(acc, a, dscale, v, dots, off + v, s)
        if mode == SIX or mode == THREE:  # the second 16-weight half's dots, n_lanes on
            add_scaled_dots16(acc, a, mscale, v, dots, off + n_lanes + v, s)
        elif mode == TWO:  # halves: scales and minimums of each, n_lanes apart
            add_scaled_dots16(acc, a, dscale, n_lanes + v, dots, off + n_lanes + v, s)
            add_scaled16(acc, a, mscale, v, -xq_sums[t, 2 * b])
            add_scaled16(acc, a, mscale, n_lanes + v, -xq_sums[t, 2 * b + 1])
        elif mode == 0:
            add_scaled16(acc, a, dscale, v, offset * xq_sums[t, b])
        elif mode == 1:
            add_scaled16(acc, a, mscale, v, xq_sums[t, b])
        elif mode == 2:
            add_scaled16(acc, a, mscale, v, -xq_sums[t, b])
        elif int8 and mode == BYTES:
            add_scaled16(acc, a, dscale, v, np.float32(-128) * xq_sums[t, b])


@njit(**OPTS, inline="always")
def block_scales(d, m, sc, mn, mode, g, b, dscale, mscale, n_lanes):
    """Sub-block b's row scales (and minimums) of group g, as fold_dots takes them (Q6_K: the scales
    of its two halves; Q2_K: the halves' scales and minimums, n_lanes apart)."""
    if mode == SIX or mode == THREE:
        sb = b // 8
        for r in range(n_lanes):
            dd = half_to_float(d[g, sb, r])
            dscale[r] = dd * np.float32(sc[g, 2 * b, r])
            mscale[r] = dd * np.float32(sc[g, 2 * b + 1, r])
    elif mode == TWO:
        sb = b // 8
        for r in range(n_lanes):
            dd, mm = half_to_float(d[g, sb, r]), half_to_float(m[g, sb, r])
            lo, hi = np.int32(sc[g, 2 * b, r]), np.int32(sc[g, 2 * b + 1, r])
            dscale[r] = dd * np.float32(np.int32(lo & np.int32(15)))
            mscale[r] = mm * np.float32(np.int32(lo >> np.int32(4)))
            dscale[n_lanes + r] = dd * np.float32(np.int32(hi & np.int32(15)))
            mscale[n_lanes + r] = mm * np.float32(np.int32(hi >> np.int32(4)))
    elif mode == LEVELS_K:
        sb = b // 8
        for r in range(n_lanes):
            dscale[r] = half_to_float(d[g, sb, r]) * np.float32(sc[g, b, r])
    elif mode == 2:
        sb = b // 8
        for r in range(n_lanes):
            dscale[r] = half_to_float(d[g, sb, r]) * np.float32(sc[g, b, r])
            mscale[r] = half_to_float(m[g, sb, r]) * np.float32(mn[g, b, r])
    else:
        for r in range(n_lanes):
            dscale[r] = half_to_float(d[g, b, r])
        if mode == 1:
            for r in range(n_lanes):
                mscale[r] = half_to_float(m[g, b, r])


@njit(**OPTS, inline="always")
def quads_fit(mode, n_quads):
    """Whether a dot layout's 4-byte groups per sub-block fit its scale mode (dot_block_* unroll them).
    The dot-only types' kinds (16 and up: intrinsics.py) fit only their own modes."""
    if mode == BYTES:
        return n_quads == BYTE_QUADS
    if mode == SIX:
        return n_quads == SIX_QUADS
    if mode == THREE:
        return n_quads == CRUMB3_KIND
    if mode == TWO:
        return n_quads == CRUMB_KIND
    if mode == LEVELS or mode == LEVELS_K:
        return n_quads == LEVEL_KIND
    return (mode == 0 or mode == 1 or mode == 2) and (n_quads == NIBBLE_QUADS or n_quads == FIVE_QUADS)


@njit(**OPTS, inline="always")
def kind_quads(kind):
    """A kind's 4-byte groups per sub-block (intrinsics.py: kinds from 16 up hold kind % 16)."""
    return kind % 16


@njit(**OPTS, inline="always")
def dot_item(kind, int8, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width):
    """matvec_dot_*'s work item: one group of rows (or a column range of it), token by token."""
    n_tok = dx.shape[0]
    n_lanes = width // 4
    n_split = max(1, parts.shape[0])
    wide_vectors()
    item, t_lo, t_hi = token_range(item, token_splits(parts), n_tok)
    g, k, b0, b1 = split_range(item, n_split, n_sub)
    acc = np.zeros((n_tok, n_lanes), np.float32)
    dots = np.empty(2 * n_lanes, np.int32)  # a row's dot (and Q6_K's second half's)
    dscale = np.empty(2 * n_lanes, np.float32)  # this block's row scales (and minimums), once for all tokens
    mscale = np.empty(2 * n_lanes, np.float32)  # (Q2_K: of both halves)
    quads = kind_quads(kind)
    step = n_sub * quads * width
    for b in range(b0, b1):
        at0 = g * step + b * quads * width
        for c in range(0, quads * width, 64):
            prefetch(flat, at0 + PREFETCH_BYTES + c)
        block_scales(d, m, sc, mn, mode, g, b, dscale, mscale, n_lanes)
        for t in range(t_lo, t_hi):
            xb = t * n_words + b * WORDS
            for v in range(n_lanes // 16):
                dot_block1(kind, int8, dots, v * 16, flat, at0 + v * 64, width, xs, xb)
            fold_dots(int8, acc, t, dots, 0, mode, dscale, mscale, dx[t, b], xq_sums, b, offset, n_lanes)
    store_group(acc, y, parts, g, k, n_lanes, t_lo, t_hi)


@njit(**OPTS, inline="always")
def dot_batch_item(kind, int8, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width):
    """matvec_dot_batch_*'s work item: one group of rows (or a column range of it), or one group and
    one range of tokens (token_splits: then its column ranges one after another), tokens 4 or 2 at a
    time."""
    n_tok = dx.shape[0]
    n_lanes = width // 4
    n_split = max(1, parts.shape[0])
    wide_vectors()
    item, t_lo, t_hi = token_range(item, token_splits(parts), n_tok)
    g, k, b0, b1 = split_range(item, n_split, n_sub)
    n_cols = column_ranges(parts)
    acc = np.zeros((n_tok, n_lanes), np.float32)
    total = np.zeros((n_tok, n_lanes), np.float32) if n_cols > 1 else acc  # the column ranges' sum
    L = 2 * n_lanes  # a token's dots (a row's, and Q6_K's second half's)
    dots = np.empty(4 * L, np.int32)  # four tokens' lanes
    dscale = np.empty(2 * n_lanes, np.float32)  # this block's row scales (and minimums), once for all tokens
    mscale = np.empty(2 * n_lanes, np.float32)  # (Q2_K: of both halves)
    quads = kind_quads(kind)
    step = n_sub * quads * width
    for col in range(n_cols):
        c0, c1 = b0 + col * (b1 - b0) // n_cols, b0 + (col + 1) * (b1 - b0) // n_cols
        if n_cols > 1:
            for t in range(t_lo, t_hi):
                for r in range(n_lanes):
                    acc[t, r] = 0
        for b in range(c0, c1):
            at0 = g * step + b * quads * width
            for c in range(0, quads * width, 64):
                prefetch(flat, at0 + PREFETCH_BYTES + c)
            block_scales(d, m, sc, mn, mode, g, b, dscale, mscale, n_lanes)
            t0 = t_lo
            while t0 + 1 < t_hi:  # tokens four or two at a time: each weight group unpacked once for them
                n = 4 if t0 + 4 <= t_hi else 2
                xb = t0 * n_words + b * WORDS  # token t0's words of this sub-block in xs
                for v in range(n_lanes // 16):
                    w_at, o = at0 + v * 64, v * 16
                    if n == 4:
                        dot_block4(kind, int8, dots, o, L + o, 2 * L + o, 3 * L + o, flat, w_at, width, xs,
                                   xb, xb + n_words, xb + 2 * n_words, xb + 3 * n_words)
                    else:
                        dot_block2(kind, int8, dots, o, L + o, flat, w_at, width, xs, xb, xb + n_words)
                for t in range(t0, t0 + n):
                    fold_dots(int8, acc, t, dots, (t - t0) * L, mode, dscale, mscale, dx[t, b], xq_sums, b, offset, n_lanes)
                t0 += n
            if t0 < t_hi:  # an odd batch's last token
                xb = t0 * n_words + b * WORDS
                for v in range(n_lanes // 16):
                    dot_block1(kind, int8, dots, v * 16, flat, at0 + v * 64, width, xs, xb)
                fold_dots(int8, acc, t0, dots, 0, mode, dscale, mscale, dx[t0, b], xq_sums, b, offset, n_lanes)
        if n_cols > 1:
            for t in range(t_lo, t_hi):
                for r in range(n_lanes):
                    total[t, r] += acc[t, r]
    store_group(total, y, parts, g, k, n_lanes, t_lo, t_hi)


@njit(**OPTS)
def half_sums(xq, dx):
    """xq_sums per 16 weights (the halves of each run of 32 that dx scales) from the int16 words xq."""
    n_tok, n_words = xq.shape
    q = xq.reshape(-1).view(np.int16)
    out = np.empty((n_tok, n_words // 4), np.float32)
    for t in range(n_tok):
        for k in range(n_words // 4):
            total = np.int32(0)
            for j in range(16):
                total += np.int32(q[t * 4 * n_words + 16 * k + j])
            out[t, k] = dx[t, k // 2] * np.float32(total)
    return out


@njit(**OPTS, inline="always")
def dot_setup(kind, qs, mode, x, parts):
    """The kernels' entry check and shared start: x's int16 words, scales and sums (see dot_item)."""
    n_groups, n_sub, n_quads, width = qs.shape
    assert n_quads == kind_quads(kind) and quads_fit(mode, kind) and token_splits(parts) <= max(1, x.shape[0])
    xq, dx, xq_sums = quantize_activations(x, 4 * WORDS, pair_words(kind))
    if kind == CRUMB_KIND:  # Q2_K's minimums: sums per 16 weights
        xq_sums = half_sums(xq, dx)
    n_items = n_groups * max(1, parts.shape[0]) * token_splits(parts)
    return n_items, qs.reshape(-1), xq.reshape(-1), xq.shape[1], dx, xq_sums, n_sub, width


@njit(**OPTS, inline="always")
def dot8_setup(kind, qs, mode, x, parts):
    """dot_setup for the int8 kernels: x's int8 words."""
    n_groups, n_sub, n_quads, width = qs.shape
    assert n_quads == kind and quads_fit(mode, kind) and kind != SIX_QUADS and token_splits(parts) <= max(1, x.shape[0])
    xq, dx, xq_sums = quantize_activations8(x, 4 * WORDS)
    n_items = n_groups * max(1, parts.shape[0]) * token_splits(parts)
    return n_items, qs.reshape(-1), xq.reshape(-1), xq.shape[1], dx, xq_sums, n_sub, width


# The matrix-vector kernels of the dot layouts: Q4_0/Q4_1/Q4_K (nibbles) and Q5_0/Q5_1/Q5_K (nibbles and a
# plane of high bits), scale modes 0-2 as in nibble_fold; Q6_K (mode SIX); Q8_0 (mode BYTES, a weight a
# byte). matvec_dot_*: one token (decode), token by token; matvec_dot_batch_*: 2+ tokens, each weight
# group loaded and unpacked once for four or two tokens, each token's integer dots and float steps those
# matvec_dot_* gives it alone. Separate kernels, not branches of one:
# - per kind: one kernel for all kinds compiled every kind's unrolled code for every type (a Q4_K_M
#   file's first start went from ~27 to 100-160 s), and branching per sub-block cost 5-8% on Q4_0/Q4_K
#   (a loop per kind with the kind a constant does not: but two such loops, or two branches to such
#   code, in one kernel compiled ~2x as long as two kernels);
# - single and batch: with the grouped loop in it, the lone-token decode of the 1.1B fell from ~55 to
#   ~47 tok/s (benchmarks/README.md, batched.py). One loop that picks among 4, 2 and 1 tokens per step
#   ran the batch at under half this speed: the last token has its own loop.

@njit(**PARALLEL)
def matvec_dot_nibbles(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(NIBBLE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(NIBBLE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_bytes(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(BYTE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(BYTE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_five(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(FIVE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(FIVE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_six(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(SIX_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(SIX_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_nibbles(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(NIBBLE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(NIBBLE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_bytes(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(BYTE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(BYTE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_five(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(FIVE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(FIVE_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
                       n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_six(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_setup(SIX_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(SIX_QUADS, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
                       n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


# The int8-activation kernels (AVX512-VNNI's vpdpbusd: intrinsics.has_int8_dot): the same work items with
# x rounded to int8 per 32, for every dot layout but Q6_K's (whose signed 6-bit weights keep int16).

@njit(**PARALLEL)
def matvec_dot8_nibbles(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(NIBBLE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(NIBBLE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot8_batch_nibbles(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(NIBBLE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(NIBBLE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot8_five(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(FIVE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(FIVE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot8_batch_five(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(FIVE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(FIVE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot8_bytes(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(BYTE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_item(BYTE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot8_batch_bytes(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot8_setup(BYTE_QUADS, qs, mode, x, parts)
    for item in prange(n_items):
        dot_batch_item(BYTE_QUADS, True, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
               n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**OPTS, inline="always")
def unpack_byte(words, at0, i, mode, scale, bias, out, lo, hi, c0, n_lanes):
    """Byte i of the rows' words words[at0:at0 + n_lanes]: its weight(s) into out's columns c0..."""
    if mode == BYTES:  # sign-extended
        for r in range(n_lanes):
            q = np.int32(np.uint32(words[at(at0 + r)] << np.uint32(24 - 8 * i))) >> np.int32(24)
            out[at(lo + i), at(c0 + r)] = scale[r] * np.float32(q)
    else:
        for r in range(n_lanes):
            q = np.int32(np.uint32(words[at(at0 + r)] >> np.uint32(8 * i)) & np.uint32(255))
            out[at(lo + i), at(c0 + r)] = scale[r] * np.float32(np.int32(q & np.int32(15))) + bias[r]
            out[at(hi + i), at(c0 + r)] = scale[r] * np.float32(np.int32(q >> np.int32(4))) + bias[r]


@njit(**OPTS, inline="always")
def unpack_planed_byte(words, at0, pw_lo, pw_hi, i, sh_lo, sh_hi, mask, sub, scale, scale_hi, bias, out, lo, hi,
                       c0, n_lanes):
    """unpack_byte for 5- and 6-bit weights: the high bits of byte i's two weights come from the plane
    words at pw_lo and pw_hi (bits sh_lo, sh_hi up of their byte i); the value is q - sub."""
    for r in range(n_lanes):
        q = np.int32(np.uint32(words[at(at0 + r)] >> np.uint32(8 * i)) & np.uint32(255))
        p_lo = np.int32(np.uint32(words[at(pw_lo + r)] >> np.uint32(8 * i + sh_lo)) & np.uint32(mask))
        p_hi = np.int32(np.uint32(words[at(pw_hi + r)] >> np.uint32(8 * i + sh_hi)) & np.uint32(mask))
        q_lo = np.int32(np.int32(q & np.int32(15)) | np.int32(p_lo << np.int32(4)))
        q_hi = np.int32(np.int32(q >> np.int32(4)) | np.int32(p_hi << np.int32(4)))
        out[at(lo + i), at(c0 + r)] = scale[r] * np.float32(np.int32(q_lo - sub)) + bias[r]
        out[at(hi + i), at(c0 + r)] = scale_hi[r] * np.float32(np.int32(q_hi - sub)) + bias[r]


@njit(**OPTS)
def unpack_dot(qs, d, m, sc, mn, mode, offset, g0, g1, out):
    n_groups, n_sub, n_quads, width = qs.shape
    assert quads_fit(mode, n_quads)
    n_lanes = width // 4
    n_bytes = BYTE_QUADS if mode == BYTES else NIBBLE_QUADS  # groups of weight bytes; the rest are planes
    bits = n_quads - n_bytes  # 0, 1 (5-bit weights) or 2 (Q6_K)
    sub = np.int32(32) if mode == SIX else np.int32(0)
    words = qs.reshape(-1).view(np.uint32)  # a row's 4 bytes as one word: contiguous loads over rows
    scale = np.empty(n_lanes, np.float32)
    scale_hi = np.empty(n_lanes, np.float32)  # Q6_K's second 16 weights
    bias = np.zeros(n_lanes, np.float32)
    wide_vectors()
    for gi in range(g1 - g0):
        g, c0 = g0 + gi, gi * n_lanes
        for b in range(n_sub):
            if mode == BYTES:
                for r in range(n_lanes):
                    scale[r] = half_to_float(d[g, b, r])
            elif mode == SIX:
                block_scales(d, m, sc, mn, mode, g, b, scale, scale_hi, n_lanes)
            else:
                nibble_scales(d, m, sc, mn, mode, offset, g, b, scale, bias, n_lanes)
                scale_hi[:] = scale
            first = (g * n_sub + b) * n_quads  # the sub-block's first 4-byte group
            for j in range(n_bytes):
                lo = b * 32 + 4 * j  # weights lo..lo+3 (low nibbles, or bytes), hi..hi+3 (high)
                hi = lo + 16
                at0 = (first + j) * n_lanes
                if bits == 0:
                    # byte i of each word, one call per byte: constant shifts stay on 32-bit lanes
                    unpack_byte(words, at0, 0, mode, scale, bias, out, lo, hi, c0, n_lanes)
                    unpack_byte(words, at0, 1, mode, scale, bias, out, lo, hi, c0, n_lanes)
                    unpack_byte(words, at0, 2, mode, scale, bias, out, lo, hi, c0, n_lanes)
                    unpack_byte(words, at0, 3, mode, scale, bias, out, lo, hi, c0, n_lanes)
                else:
                    pos_lo, pos_hi = 2 * j * bits, (2 * j + 1) * bits  # see _planes in packing.py
                    pw_lo = (first + n_bytes + pos_lo // 8) * n_lanes
                    pw_hi = (first + n_bytes + pos_hi // 8) * n_lanes
                    mask = (1 << bits) - 1
                    for i in range(4):
                        unpack_planed_byte(words, at0, pw_lo, pw_hi, i, pos_lo % 8, pos_hi % 8, mask, sub, scale,
                                           scale_hi, bias, out, lo, hi, c0, n_lanes)


# The dot-only types' kernels (packing.DOT_ONLY_TYPES, int16 only): Q2_K (crumbs, mode TWO), Q3_K (crumbs
# and a plane of third bits, mode THREE: Q6_K's scales and fold) and IQ4_NL/IQ4_XS (codes looked up in
# IQ4_LEVELS, modes LEVELS/LEVELS_K), the same work items as the kernels above. On entry they check every
# array they index against qs (scales per 256, 32 or 16 weights as the mode reads them, x, y, parts).

@njit(**OPTS, inline="always")
def scales_fit(mode, qs, d, m, sc):
    """Whether the scale arrays hold what mode reads for every group and sub-block of qs."""
    n_groups, n_sub, n_quads, width = qs.shape
    n_lanes = width // 4
    if d.shape[0] != n_groups or d.shape[2] != n_lanes:
        return False
    if mode == LEVELS:  # d per 32
        return d.shape[1] == n_sub
    per_sub = 2 if mode == TWO or mode == THREE else 1  # scales per 32 weights
    ok = n_sub % 8 == 0 and d.shape[1] == n_sub // 8 and sc.shape[0] == n_groups and sc.shape[1] == per_sub * n_sub
    ok = ok and sc.shape[2] == n_lanes
    if mode == TWO:
        ok = ok and m.shape[0] == n_groups and m.shape[1] == n_sub // 8 and m.shape[2] == n_lanes
    return ok


@njit(**OPTS, inline="always")
def dot_only_setup(kind, qs, d, m, sc, mode, x, y, parts):
    """dot_setup with the dot-only kernels' full entry check."""
    n_groups, n_sub, n_quads, width = qs.shape
    n_tok, n_rows = x.shape[0], n_groups * (width // 4)
    assert quads_fit(mode, kind) and scales_fit(mode, qs, d, m, sc)
    assert x.shape[1] == n_sub * 4 * WORDS and y.shape[0] == n_tok
    assert parts.shape[0] == 0 or (parts.shape[1] == n_tok and parts.shape[2] == n_rows and y.shape[1] <= n_rows)
    return dot_setup(kind, qs, mode, x, parts)


@njit(**PARALLEL)
def matvec_dot_crumbs(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(CRUMB_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_item(CRUMB_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub,
                 width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_crumbs3(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(CRUMB3_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_item(CRUMB3_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub,
                 width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_levels(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(LEVEL_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_item(LEVEL_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts, n_sub,
                 width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_crumbs(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(CRUMB_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_batch_item(CRUMB_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
                       n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_crumbs3(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(CRUMB3_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_batch_item(CRUMB3_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
                       n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


@njit(**PARALLEL)
def matvec_dot_batch_levels(qs, d, m, sc, mn, mode, offset, x, y, parts):
    n_items, flat, xs, n_words, dx, xq_sums, n_sub, width = dot_only_setup(LEVEL_KIND, qs, d, m, sc, mode, x, y, parts)
    for item in prange(n_items):
        dot_batch_item(LEVEL_KIND, False, item, flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y, parts,
                       n_sub, width)
    if parts.shape[0] > 0:
        sum_parts(y, parts)


LEVEL_VALUES = np.array(IQ4_LEVELS, np.float32)


@njit(**OPTS)
def unpack_crumbs(qs, d, m, sc, mn, mode, offset, g0, g1, out):
    """unpack_dot for Q2_K and Q3_K: weight 4w + i of a sub-block from crumb w // 2 of byte i of its
    group w % 2 (and, Q3_K, bit w of byte i of its plane); half w // 4's scale (and minimum)."""
    n_groups, n_sub, n_quads, width = qs.shape
    n_lanes = width // 4
    assert quads_fit(mode, 16 + n_quads) and (mode == TWO or mode == THREE) and scales_fit(mode, qs, d, m, sc)
    assert 0 <= g0 <= g1 <= n_groups and out.shape[0] == n_sub * 32 and out.shape[1] >= (g1 - g0) * n_lanes
    words = qs.reshape(-1).view(np.uint32)
    scale = np.empty(2 * n_lanes, np.float32)
    bias = np.zeros(2 * n_lanes, np.float32)
    wide_vectors()
    for gi in range(g1 - g0):
        g, c0 = g0 + gi, gi * n_lanes
        for b in range(n_sub):
            block_scales(d, m, sc, mn, mode, g, b, scale, bias, n_lanes)
            if mode == THREE:  # the second half's scale is in bias (as Q6_K's): move it, no minimums
                for r in range(n_lanes):
                    scale[n_lanes + r] = bias[r]
                    bias[r] = 0
            first = (g * n_sub + b) * n_quads
            for w in range(8):
                at0 = (first + w % 2) * n_lanes
                h = (w // 4) * n_lanes
                for i in range(4):
                    shift = np.uint32(8 * i + 2 * (w // 2))
                    if mode == THREE:
                        pw = (first + 2) * n_lanes
                        for r in range(n_lanes):
                            q = np.int32(np.uint32(words[at(at0 + r)] >> shift) & np.uint32(3))
                            hb = np.int32(np.uint32(words[at(pw + r)] >> np.uint32(8 * i + w)) & np.uint32(1))
                            q = np.int32(np.int32(q | np.int32(hb << np.int32(2))) - np.int32(4))
                            out[at(b * 32 + 4 * w + i), at(c0 + r)] = scale[h + r] * np.float32(q)
                    else:
                        for r in range(n_lanes):
                            q = np.int32(np.uint32(words[at(at0 + r)] >> shift) & np.uint32(3))
                            out[at(b * 32 + 4 * w + i), at(c0 + r)] = scale[h + r] * np.float32(q) - bias[h + r]


@njit(**OPTS)
def unpack_levels(qs, d, m, sc, mn, mode, offset, g0, g1, out):
    """unpack_dot for IQ4_NL and IQ4_XS: the nibble layout's codes, looked up in LEVEL_VALUES."""
    n_groups, n_sub, n_quads, width = qs.shape
    n_lanes = width // 4
    assert quads_fit(mode, 16 + n_quads) and scales_fit(mode, qs, d, m, sc)
    assert 0 <= g0 <= g1 <= n_groups and out.shape[0] == n_sub * 32 and out.shape[1] >= (g1 - g0) * n_lanes
    words = qs.reshape(-1).view(np.uint32)
    scale = np.empty(n_lanes, np.float32)
    unused = np.empty(n_lanes, np.float32)
    wide_vectors()
    for gi in range(g1 - g0):
        g, c0 = g0 + gi, gi * n_lanes
        for b in range(n_sub):
            block_scales(d, m, sc, mn, mode, g, b, scale, unused, n_lanes)
            first = (g * n_sub + b) * n_quads
            for j in range(n_quads):
                at0 = (first + j) * n_lanes
                for i in range(4):
                    for r in range(n_lanes):
                        q = np.uint32(words[at(at0 + r)] >> np.uint32(8 * i))
                        lo = LEVEL_VALUES[at(q & np.uint32(15))]
                        hi = LEVEL_VALUES[at(np.uint32(q >> np.uint32(4)) & np.uint32(15))]
                        out[at(b * 32 + 4 * j + i), at(c0 + r)] = scale[r] * lo
                        out[at(b * 32 + 16 + 4 * j + i), at(c0 + r)] = scale[r] * hi
