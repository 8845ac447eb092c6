"""Everything but the matrix products: norms, rotary embedding, attention with its KV-cache write, and
activations. One compiled call per op replaces several numpy calls (each ~1-5 us of dispatch).

exp is computed inline (`fast_exp`: Cephes' expf polynomial, within 1.2e-7 relative of np.exp on its
range) because numba without SVML calls libm's scalar expf: 2.5 ns against 0.3 ns per value (measured),
in softmax and SwiGLU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .common import OPTS, SOFTMAX_OPTS, SOFTMAX_PARALLEL, at
from .intrinsics import bits_to_float, half_to_float, load_f16, prefetch, tile4x32, wide_vectors

LOG2E = np.float32(1.4426950408889634)
EXP_HI = np.float32(88.0)  # exp(88) is the largest power-of-two step that stays finite here
EXP_LO = np.float32(-87.33654)  # below this exp(x) is denormal: returned as 2**-126 * exp(r) ~ 1e-38


@njit(**OPTS, inline="always")
def fast_exp(x):
    """exp(x) for float32 x: 2**k * p(r) with r = x - k*ln2 (Cody-Waite split), vectorizable."""
    x = min(max(x, EXP_LO), EXP_HI)
    k = np.floor(x * LOG2E + np.float32(0.5))
    r = x - k * np.float32(0.693359375)
    r = r + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1)
    return p * bits_to_float(np.uint32((np.int32(k) + 127) << 23))


@njit(**OPTS)
def rms_norm(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w, per row of x (T, n)."""
    wide_vectors()
    n_tok, n = x.shape
    for t in range(n_tok):
        s = np.float32(0)
        for i in range(n):
            s += x[t, i] * x[t, i]
        inv = np.float32(1) / np.sqrt(s / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


@njit(**OPTS)
def layer_norm(x, w, b, eps, out):
    """(x - mean) / sqrt(var + eps) * w + b per row; w, b may be empty (absent)."""
    wide_vectors()
    n_tok, n = x.shape
    has_w, has_b = w.shape[0] > 0, b.shape[0] > 0
    for t in range(n_tok):
        mean = np.float32(0)
        for i in range(n):
            mean += x[t, i]
        mean /= np.float32(n)
        var = np.float32(0)
        for i in range(n):
            var += (x[t, i] - mean) * (x[t, i] - mean)
        inv = np.float32(1) / np.sqrt(var / np.float32(n) + np.float32(eps))
        for i in range(n):
            y = (x[t, i] - mean) * inv
            if has_w:
                y *= w[i]
            if has_b:
                y += b[i]
            out[t, i] = y


@njit(**OPTS)
def rope(x, positions, cos, sin, n_dims, neox, out):
    """Rotary embedding of x (T, H, D) at `positions`, from cos/sin tables (n_positions, n_dims/2).
    Features past n_dims are copied unchanged."""
    wide_vectors()
    n_tok, n_head, dim = x.shape
    half = n_dims // 2
    for t in range(n_tok):
        p = positions[t]
        for h in range(n_head):
            if neox:
                for i in range(half):
                    a, b = x[t, h, i], x[t, h, half + i]
                    out[t, h, i] = a * cos[p, i] - b * sin[p, i]
                    out[t, h, half + i] = a * sin[p, i] + b * cos[p, i]
            else:
                for i in range(half):
                    a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                    out[t, h, 2 * i] = a * cos[p, i] - b * sin[p, i]
                    out[t, h, 2 * i + 1] = a * sin[p, i] + b * cos[p, i]
            for i in range(n_dims, dim):
                out[t, h, i] = x[t, h, i]


# -- KV cache stores of other types (kv_cache.py): f16 rows as their uint16 bits, q8_0 rows as int8
# (blocks of an f16 scale, read by load_f16, and 32 signed quants). The helpers are overloaded on the
# store's dtype and inlined, so a float32 store compiles to the loops it always had.

Q8_VALUES, Q8_BYTES = 32, 34
AHEAD = 16  # key rows paged attention prefetches ahead of the four it works on


@njit(cache=True)
def half_bits(f):
    """The IEEE half-precision bits of float32 f, rounded to nearest even (numpy's astype(float16),
    ggml's FP32_TO_FP16 with F16C): F. Giesen's float_to_half_fast3_rtne. Exact float math only:
    callers compile without fastmath."""
    x = np.int64(np.float32(f).view(np.uint32))
    sign = (x >> 16) & 0x8000
    x &= 0x7FFFFFFF
    if x >= 0x47800000:  # 65536 and up: inf (NaN stays NaN)
        o = 0x7E00 if x > 0x7F800000 else 0x7C00
    elif x < 0x38800000:  # below 2**-14: a subnormal half, rounded by adding 0.5 in float32
        o = np.int64(np.float32(bits_to_float(np.uint32(x)) + np.float32(0.5)).view(np.uint32)) - 0x3F000000
    else:  # rebias the exponent, round the 13 dropped mantissa bits to nearest even
        o = (x - 0x38000000 + 0xFFF + ((x >> 13) & 1)) >> 13
    return np.uint16(o | sign)


def row_values(store):
    """Values per head in a row of the cache store `store` (n_rows, n_kv, width)."""


@overload(row_values, inline="always")
def _row_values(store):
    if store.dtype == types.int8:
        return lambda store: store.shape[2] // Q8_BYTES * Q8_VALUES
    return lambda store: store.shape[2]


def row_dot(x, x0, store, base, n):
    """sum over i < n of x[x0 + i] * value i of the store's row at flat index `base`."""


@overload(row_dot, inline="always")
def _row_dot(x, x0, store, base, n):
    if store.dtype == types.float32:
        def impl(x, x0, store, base, n):
            dot = np.float32(0)
            for i in range(n):
                dot += x[at(x0 + i)] * store[at(base + i)]
            return dot
    elif store.dtype == types.uint16:
        def impl(x, x0, store, base, n):
            dot = np.float32(0)
            for i in range(n):
                dot += x[at(x0 + i)] * half_to_float(store[at(base + i)])
            return dot
    elif store.dtype == types.int8:
        def impl(x, x0, store, base, n):
            n_blocks = n // Q8_VALUES
            # Q8_VALUES, as a value LLVM cannot see: a loop of a constant 32 gets unrolled to scalar
            # code instead of vectorized (measured 4x slower)
            step = n // n_blocks
            dot = np.float32(0)
            for b in range(n_blocks):
                o = base + b * Q8_BYTES
                xb = x0 + b * step
                part = np.float32(0)
                for j in range(step):
                    part += x[at(xb + j)] * np.float32(store[at(o + 2 + j)])
                dot += load_f16(store, at(o)) * part
            return dot
    else:
        return None
    return impl


def row_axpy(acc, a0, w, store, base, n):
    """acc[a0 + i] += w * value i of the store's row at flat index `base`, for i < n."""


@overload(row_axpy, inline="always")
def _row_axpy(acc, a0, w, store, base, n):
    if store.dtype == types.float32:
        def impl(acc, a0, w, store, base, n):
            for i in range(n):
                acc[at(a0 + i)] += w * store[at(base + i)]
    elif store.dtype == types.uint16:
        def impl(acc, a0, w, store, base, n):
            for i in range(n):
                acc[at(a0 + i)] += w * half_to_float(store[at(base + i)])
    elif store.dtype == types.int8:
        def impl(acc, a0, w, store, base, n):
            n_blocks = n // Q8_VALUES
            step = n // n_blocks  # Q8_VALUES (see row_dot)
            for b in range(n_blocks):
                o = base + b * Q8_BYTES
                ab = a0 + b * step
                wd = w * load_f16(store, at(o))
                for j in range(step):
                    acc[at(ab + j)] += wd * np.float32(store[at(o + 2 + j)])
    else:
        return None
    return impl


def store_value(store, i):
    """Value i of a float32 or f16 (uint16 bits) store, as float32."""


@overload(store_value, inline="always")
def _store_value(store, i):
    if store.dtype == types.float32:
        return lambda store, i: store[i]
    if store.dtype == types.uint16:
        return lambda store, i: half_to_float(store[i])
    return None


# Four key (value) rows at a time: one pass over q (acc) for four positions. One row at a time, each
# position's axpy reloads the sums the previous one just stored and waits on them (benchmarks/README.md,
# "Decode attention").

def rows_dot4(x, x0, store, b0, b1, b2, b3, n, out, o):
    """out[o + j] = row_dot(x, x0, store, b_j, n) for the rows at b0..b3."""


@overload(rows_dot4, inline="always")
def _rows_dot4(x, x0, store, b0, b1, b2, b3, n, out, o):
    if store.dtype == types.int8:
        def impl(x, x0, store, b0, b1, b2, b3, n, out, o):
            bases = (b0, b1, b2, b3)
            for j in range(4):  # one inlined row_dot: four copies trip numba's inliner (as put_row's)
                out[o + j] = row_dot(x, x0, store, bases[j], n)
        return impl

    def impl(x, x0, store, b0, b1, b2, b3, n, out, o):
        d0 = d1 = d2 = d3 = np.float32(0)
        for i in range(n):
            v = x[at(x0 + i)]
            d0 += v * store_value(store, at(b0 + i))
            d1 += v * store_value(store, at(b1 + i))
            d2 += v * store_value(store, at(b2 + i))
            d3 += v * store_value(store, at(b3 + i))
        out[o], out[o + 1], out[o + 2], out[o + 3] = d0, d1, d2, d3
    return impl


def rows_axpy4(acc, a0, w0, w1, w2, w3, store, b0, b1, b2, b3, n):
    """row_axpy of the rows at b0..b3 with weights w0..w3, in one pass over acc."""


@overload(rows_axpy4, inline="always")
def _rows_axpy4(acc, a0, w0, w1, w2, w3, store, b0, b1, b2, b3, n):
    if store.dtype == types.int8:
        def impl(acc, a0, w0, w1, w2, w3, store, b0, b1, b2, b3, n):
            bases, weights = (b0, b1, b2, b3), (w0, w1, w2, w3)
            for j in range(4):
                row_axpy(acc, a0, weights[j], store, bases[j], n)
        return impl

    def impl(acc, a0, w0, w1, w2, w3, store, b0, b1, b2, b3, n):
        for i in range(n):
            acc[at(a0 + i)] += ((w0 * store_value(store, at(b0 + i)) + w1 * store_value(store, at(b1 + i)))
                                + (w2 * store_value(store, at(b2 + i)) + w3 * store_value(store, at(b3 + i))))
    return impl


def put_row(x, t, h, store, r):
    """store[r, h] = x[t, h] rounded to the store's type."""


# not inlined: numba's inliner trips over this helper's branches in loops (NumbaIRAssumptionWarning);
# a call per head and row costs nothing beside the rounding
@overload(put_row, jit_options=dict(error_model="numpy", boundscheck=False))
def _put_row(x, t, h, store, r):
    if store.dtype == types.float32:
        def impl(x, t, h, store, r):
            for i in range(x.shape[2]):
                store[r, h, i] = x[t, h, i]
    elif store.dtype == types.uint16:
        def impl(x, t, h, store, r):
            for i in range(x.shape[2]):
                store[r, h, i] = half_bits(x[t, h, i])
    elif store.dtype == types.int8:
        def impl(x, t, h, store, r):  # quantize_row_q8_0_ref's steps (gguf.quants': the same bits)
            for b in range(x.shape[2] // Q8_VALUES):
                xb, o = b * Q8_VALUES, b * Q8_BYTES
                amax = np.float32(0)
                for j in range(Q8_VALUES):
                    amax = max(amax, abs(x[t, h, xb + j]))
                d = amax / np.float32(127)
                inv = np.float32(1) / d if d != 0 else np.float32(0)
                bits = half_bits(d)
                store[r, h, o] = np.int8(bits & 0xFF)  # little-endian f16 (casts keep the low 8 bits)
                store[r, h, o + 1] = np.int8(bits >> 8)
                for j in range(Q8_VALUES):
                    y = x[t, h, xb + j] * inv
                    a = abs(y)
                    q = np.floor(a)
                    if a - q >= np.float32(0.5):  # roundf: halves away from zero
                        q += np.float32(1)
                    store[r, h, o + 2 + j] = np.int8(-q if y < 0 else q)
    else:
        return None
    return impl


@njit(cache=True, error_model="numpy", boundscheck=False, nogil=True)
def store_rows_rounded(k, v, keys, values, rows):
    """store_rows into stores of any type (f32, f16 bits, q8_0 int8 bytes), each value rounded as it is
    stored. No fastmath: the rounding must be bit-exact (a division by 127 made a product, say)."""
    for t in range(k.shape[0]):
        r = rows[t]
        for h in range(k.shape[1]):
            put_row(k, t, h, keys, r)
            put_row(v, t, h, values, r)


@njit(**OPTS)
def gather_rows(store, rows, out):
    """out[s] = the float32 values of store row rows[s] (n_kv heads of out.shape[2]): a prompt chunk's
    keys or values read back from an f16 or q8_0 store for its matrix products."""
    n_kv, width, n = store.shape[1], store.shape[2], out.shape[2]
    sf, of = store.reshape(-1), out.reshape(-1)
    for s in range(rows.shape[0]):
        for h in range(n_kv):
            o0 = (s * n_kv + h) * n
            for i in range(n):
                of[o0 + i] = 0
            row_axpy(of, o0, np.float32(1), sf, (rows[s] * n_kv + h) * width, n)


@njit(**OPTS)
def store_rows(k, v, keys, values, rows):
    """Write token t's key and value (k[t], v[t]) into row rows[t] of the cache's pools."""
    for t in range(k.shape[0]):
        r = rows[t]
        for h in range(k.shape[1]):
            for i in range(k.shape[2]):
                keys[r, h, i] = k[t, h, i]
            for i in range(v.shape[2]):
                values[r, h, i] = v[t, h, i]


@njit(**SOFTMAX_OPTS, inline="always")
def paged_item(q, keys, values, tables, pos, shift, t, kv, c, chunk, scale, softcap, window, slopes,
               part_max, part_sum, part_out, item):
    """One work item of paged attention: token t's query heads that share KV head kv, over the key
    positions of chunk c (c*chunk .. up to the token's own position, within its window). Leaves the
    softmax partials (max, total, weighted sum of values) in part_*[item]. A
    position p lives in row tables[t, p >> shift] << shift | p & mask of the pools. Each key and value
    row is read once for all the group's heads, through flat views of the pools (2-D row views would
    each cost a reference count update; flat indexes from 0 vectorize). The pools may be float32,
    f16 bits (uint16) or q8_0 bytes (int8): row_dot and row_axpy read each type."""
    n_kv, dim, v_dim = keys.shape[1], row_values(keys), row_values(values)
    k_width, v_width = keys.shape[2], values.shape[2]  # a row's elements per head in each store
    group = q.shape[1] // n_kv
    mask = (1 << shift) - 1
    p_t = pos[t]
    lo = max(0, p_t - window + 1) if window > 0 else 0
    a, b = max(lo, c * chunk), min(p_t + 1, (c + 1) * chunk)
    if a >= b:
        return
    n = b - a
    kf, vf = keys.reshape(-1), values.reshape(-1)
    # Rows four at a time (rows_dot4, rows_axpy4): the last four repeat the last row as needed, their
    # scores unused and their weights 0; AHEAD more for the prefetch to read.
    n4 = (n + 3) // 4 * 4
    rows = np.empty(n4 + AHEAD, np.int64)
    for s in range(n):
        p = a + s
        rows[s] = (np.int64(tables[t, p >> shift]) << shift) | (p & mask)
    for s in range(n, n4 + AHEAD):
        rows[s] = rows[n - 1]
    qg = np.empty(group * dim, np.float32)  # the group's queries, scaled
    for gi in range(group):
        for i in range(dim):
            qg[gi * dim + i] = q[t, kv * group + gi, i] * scale
    scores = np.empty(group * n4, np.float32)  # head gi's at gi * n4
    k_line, v_line = 64 // kf.itemsize, 64 // vf.itemsize  # a cache line's elements
    for s in range(0, n4, 4):
        # the pools come from memory: the hardware prefetcher alone leaves this loop waiting on them
        for j in range(s + AHEAD, s + AHEAD + 4):
            for e in range(0, k_width, k_line):
                prefetch(kf, (rows[j] * n_kv + kv) * k_width + e)
        for j in range(s, s + 4):  # the values, for after the softmax
            for e in range(0, v_width, v_line):
                prefetch(vf, (rows[j] * n_kv + kv) * v_width + e)
        b0, b1 = (rows[s] * n_kv + kv) * k_width, (rows[s + 1] * n_kv + kv) * k_width
        b2, b3 = (rows[s + 2] * n_kv + kv) * k_width, (rows[s + 3] * n_kv + kv) * k_width
        for gi in range(group):
            rows_dot4(qg, gi * dim, kf, b0, b1, b2, b3, dim, scores, gi * n4 + s)
    for gi in range(group):
        h = kv * group + gi
        sc = scores[gi * n4:gi * n4 + n]
        if softcap > 0:
            for s in range(n):
                sc[s] = np.float32(math.tanh(sc[s] / softcap)) * softcap
        if slopes.shape[0] > 0:
            for s in range(n):
                sc[s] += slopes[h] * np.float32(a + s)
        best = sc[0]
        for s in range(1, n):
            best = sc[s] if sc[s] > best else best
        total = np.float32(0)
        for s in range(n):
            e = fast_exp(sc[s] - best)
            sc[s] = e
            total += e
        for s in range(gi * n4 + n, gi * n4 + n4):
            scores[s] = 0
        part_max[item, gi] = best
        part_sum[item, gi] = total
    acc = np.zeros(group * v_dim, np.float32)
    for s in range(0, n4, 4):
        b0, b1 = (rows[s] * n_kv + kv) * v_width, (rows[s + 1] * n_kv + kv) * v_width
        b2, b3 = (rows[s + 2] * n_kv + kv) * v_width, (rows[s + 3] * n_kv + kv) * v_width
        for gi in range(group):
            w = gi * n4 + s
            rows_axpy4(acc, gi * v_dim, scores[w], scores[w + 1], scores[w + 2], scores[w + 3], vf, b0, b1, b2, b3,
                       v_dim)
    for gi in range(group):
        for i in range(v_dim):
            part_out[item, gi, i] = acc[gi * v_dim + i]


@njit(**SOFTMAX_OPTS)
def paged_items(pos, n_kv, chunk):
    """The work items of paged attention: per token, per KV head, per chunk of `chunk` positions up to
    its own; returns (first item of each token, token, KV head and chunk of each item)."""
    n_tok = pos.shape[0]
    first = np.empty(n_tok + 1, np.int64)
    first[0] = 0
    for t in range(n_tok):
        first[t + 1] = first[t] + n_kv * (pos[t] // chunk + 1)
    n = first[n_tok]
    item_t, item_kv, item_c = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    for t in range(n_tok):
        n_chunks = pos[t] // chunk + 1
        for j in range(first[t + 1] - first[t]):
            item_t[first[t] + j] = t
            item_kv[first[t] + j] = j // n_chunks
            item_c[first[t] + j] = j % n_chunks
    return first, item_t, item_kv, item_c


@njit(**SOFTMAX_OPTS)
def paged_work(q, keys, values, pos, chunk):
    """The work items (paged_items) and room for their softmax partials."""
    n_kv, group, v_dim = keys.shape[1], q.shape[1] // keys.shape[1], row_values(values)
    first, item_t, item_kv, item_c = paged_items(pos, n_kv, chunk)
    n = item_t.shape[0]
    part_max = np.full((n, group), -np.inf, np.float32)
    part_sum = np.zeros((n, group), np.float32)
    part_out = np.zeros((n, group, v_dim), np.float32)
    return first, item_t, item_kv, item_c, part_max, part_sum, part_out


@njit(**SOFTMAX_OPTS)
def paged_combine(first, pos, chunk, n_kv, part_max, part_sum, part_out, out):
    """out[t, h*Dv:] from the partials of token t's chunks (the same order whoever ran the items)."""
    n_head = out.shape[1] // part_out.shape[2]
    group, v_dim = n_head // n_kv, part_out.shape[2]
    for t in range(pos.shape[0]):
        n_chunks = pos[t] // chunk + 1
        for h in range(n_head):
            kv, gi = h // group, h % group
            base = first[t] + kv * n_chunks
            best = part_max[base, gi]
            for c in range(1, n_chunks):
                best = max(best, part_max[base + c, gi])
            total = np.float32(0)
            for i in range(v_dim):
                out[t, h * v_dim + i] = 0
            for c in range(n_chunks):
                if part_sum[base + c, gi] == 0:
                    continue  # a chunk the window left empty
                w = fast_exp(part_max[base + c, gi] - best)
                total += w * part_sum[base + c, gi]
                for i in range(v_dim):
                    out[t, h * v_dim + i] += w * part_out[base + c, gi, i]
            inv = np.float32(1) / total
            for i in range(v_dim):
                out[t, h * v_dim + i] *= inv


@njit(**SOFTMAX_OPTS)
def attention_paged(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, out):
    """Attention of tokens at positions `pos` (any sequences: token t's blocks are tables[t]) over
    their cached keys and values, serially: a "split-K" work item per (token, KV head, chunk of
    positions) reads each key and value row once for all the query heads sharing it (GQA). Each
    token's result depends on its own query, positions and chunks only, not on the other tokens or
    the thread count: attention_paged_parallel computes the same items on numba's threads."""
    wide_vectors()
    n_kv = keys.shape[1]
    first, item_t, item_kv, item_c, part_max, part_sum, part_out = paged_work(q, keys, values, pos, chunk)
    for item in range(item_t.shape[0]):
        paged_item(q, keys, values, tables, pos, shift, item_t[item], item_kv[item], item_c[item], chunk, scale,
                   softcap, window, slopes, part_max, part_sum, part_out, item)
    paged_combine(first, pos, chunk, n_kv, part_max, part_sum, part_out, out)


@njit(**SOFTMAX_PARALLEL)
def attention_paged_parallel(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, out):
    """attention_paged with the work items spread over numba's threads (same results)."""
    n_kv = keys.shape[1]
    first, item_t, item_kv, item_c, part_max, part_sum, part_out = paged_work(q, keys, values, pos, chunk)
    for item in prange(item_t.shape[0]):
        wide_vectors()
        paged_item(q, keys, values, tables, pos, shift, item_t[item], item_kv[item], item_c[item], chunk, scale,
                   softcap, window, slopes, part_max, part_sum, part_out, item)
    paged_combine(first, pos, chunk, n_kv, part_max, part_sum, part_out, out)


# The gated activations read rows that may lie apart (gate and up are column ranges of one product):
# flat arrays and row strides, not 2-D views, which numba compiles as strided ("A") arrays and does
# not vectorize (measured 18x slower for 8 rows of 1536).

@njit(**OPTS)
def swiglu(gate, g_stride, up, u_stride, out):
    """out[t] = silu(gate row t) * up row t, for the (tokens, n) out; row t of gate starts at
    gate[t * g_stride], of up at up[t * u_stride]."""
    wide_vectors()
    n = out.shape[1]
    for t in range(out.shape[0]):
        g, u, o = gate[t * g_stride:t * g_stride + n], up[t * u_stride:t * u_stride + n], out[t]
        for i in range(n):
            o[i] = g[i] / (np.float32(1) + fast_exp(-g[i])) * u[i]


@njit(**OPTS)
def geglu(gate, g_stride, up, u_stride, out):
    """As swiglu with gelu (as in `gelu`) for silu."""
    wide_vectors()
    c = np.float32(2 * 0.7978845608028654)
    n = out.shape[1]
    for t in range(out.shape[0]):
        g, u, o = gate[t * g_stride:t * g_stride + n], up[t * u_stride:t * u_stride + n], out[t]
        for i in range(n):
            v = g[i]
            y2 = c * (v + np.float32(0.044715) * v * v * v)
            o[i] = v / (np.float32(1) + fast_exp(-y2)) * u[i]


@njit(**OPTS)
def silu(x, out):
    wide_vectors()
    for i in range(x.shape[0]):
        out[i] = x[i] / (np.float32(1) + fast_exp(-x[i]))


@njit(**OPTS)
def gelu(x, out):
    """tanh-approximated GELU, written as x * sigmoid(2y) (= 0.5 x (1 + tanh(y))): no cancellation
    where tanh(y) is near -1."""
    wide_vectors()
    c = np.float32(2 * 0.7978845608028654)  # 2 * sqrt(2/pi)
    for i in range(x.shape[0]):
        v = x[i]
        y2 = c * (v + np.float32(0.044715) * v * v * v)
        out[i] = v / (np.float32(1) + fast_exp(-y2))


PROMPT_TILE = 16  # query tokens per work item of attention_prompt


@njit(**OPTS)
def prompt_tiles_fit(dim, v_dim):
    """Whether attention_prompt takes heads of these widths (its blocks: 16 of q.k's, 32 of the values')."""
    return dim % 16 == 0 and v_dim % 32 == 0 and dim > 0 and v_dim > 0


@njit(**SOFTMAX_PARALLEL)
def attention_prompt(q, keys, values, p0, scale, softcap, window, slopes, lanes, out):
    """Causal attention of a prompt chunk (tokens at positions p0, p0 + 1, ...) over keys and values
    (n_keys, n_kv, dim) of positions 0.., as blocked matrix products (tile4x32) with the masked softmax
    (softmax_rows) between them. A work item is one KV head and PROMPT_TILE query tokens: its rows are
    those tokens' query heads sharing the KV head (GQA), and it reads only the keys they may see."""
    n_tok, n_head, dim = q.shape
    n_keys, n_kv, v_dim = keys.shape[0], keys.shape[1], values.shape[2]
    group = n_head // n_kv
    assert n_head == group * n_kv and values.shape[0] == n_keys and values.shape[1] == n_kv
    assert keys.shape[2] == dim and prompt_tiles_fit(dim, v_dim) and 0 <= p0 and p0 + n_tok <= n_keys
    assert out.shape[0] == n_tok and out.shape[1] == n_head * v_dim
    n_pad = (n_keys + 31) // 32 * 32
    kt = np.zeros((n_kv, dim, n_pad), np.float32)  # keys transposed: a row of B per dimension
    vp = np.zeros((n_kv, n_pad, v_dim), np.float32)  # values per KV head, zero rows up to n_pad
    for hd in prange(n_kv * dim):  # written in order, read across rows (a head's keys stay in L1)
        h, d = hd // dim, hd % dim
        for j in range(n_keys):
            kt[h, d, j] = keys[j, h, d]
    for hj in prange(n_kv * n_keys):
        h, j = hj // n_keys, hj % n_keys
        for d in range(v_dim):
            vp[h, j, d] = values[j, h, d]
    ktf, vpf = kt.reshape(-1), vp.reshape(-1)
    n_tiles = (n_tok + PROMPT_TILE - 1) // PROMPT_TILE
    for item in prange(n_kv * n_tiles):
        wide_vectors()
        h, k = item % n_kv, item // n_kv
        # tiles short and long alternate (0, last, 1, last - 1, ...): the threads' ranges of items
        # then hold about the same number of keys
        tile = k // 2 if k % 2 == 0 else n_tiles - 1 - k // 2
        t0 = tile * PROMPT_TILE
        t1 = min(n_tok, t0 + PROMPT_TILE)
        rows = (t1 - t0) * group
        rows4 = (rows + 3) // 4 * 4
        lo = max(0, p0 + t0 - window + 1) if window > 0 else 0
        k0 = lo // 32 * 32
        n = (p0 + t1 - k0 + 31) // 32 * 32
        qs = np.zeros(rows4 * dim, np.float32)
        for t in range(t0, t1):
            for g in range(group):
                o = ((t - t0) * group + g) * dim
                for d in range(dim):
                    qs[o + d] = q[t, h * group + g, d] * scale
        scores = np.zeros((rows4, n), np.float32)
        sf = scores.reshape(-1)
        for r in range(0, rows4, 4):
            for j in range(0, n, 32):
                for d in range(0, dim, 16):
                    tile4x32(sf, r * n + j, n, qs, r * dim + d, dim, ktf, (h * dim + d) * n_pad + k0 + j, n_pad)
        softmax_rows(scores[:rows], p0 + t0, group, k0, softcap, window, slopes, h * group, lanes)
        acc = np.zeros(rows4 * v_dim, np.float32)
        for r in range(0, rows4, 4):
            for v in range(0, v_dim, 32):
                for j in range(0, n, 16):
                    tile4x32(acc, r * v_dim + v, v_dim, sf, r * n + j, n, vpf, (h * n_pad + k0 + j) * v_dim + v, v_dim)
        for t in range(t0, t1):
            for g in range(group):
                o = ((t - t0) * group + g) * v_dim
                for d in range(v_dim):
                    out[t, (h * group + g) * v_dim + d] = acc[o + d]


@njit(**SOFTMAX_OPTS)
def softmax_rows(scores, pos0, group, k0, softcap, window, slopes, head0, lanes):
    """Turn (already scaled) q.k scores into attention weights in place, for prefill attention (tiled or BLAS).

    scores (rows, n_keys): row i is query (token pos0 + i // group, head head0 + i % group), column c
    key position k0 + c. Applies softcap and ALiBi, then softmax over the keys the query may see
    (causal, within `window`); the others get weight 0. Loops run over slices from 0: an index numba
    cannot prove non-negative gets a wraparound test that stops vectorization (measured 8x)."""
    wide_vectors()
    n_rows, n_keys = scores.shape
    most = np.empty(lanes, np.float32)
    for i in range(n_rows):
        pos = pos0 + i // group
        lo = max(k0, pos - window + 1) if window > 0 else k0
        a, b = lo - k0, min(pos + 1 - k0, n_keys)
        row = scores[i]
        seg = row[a:b]
        n = seg.shape[0]
        if softcap > 0:
            for c in range(n):
                seg[c] = np.float32(math.tanh(seg[c] / softcap)) * softcap
        if slopes.shape[0] > 0:
            slope = slopes[head0 + i % group]
            for c in range(n):
                seg[c] += slope * np.float32(lo + c)
        best = span_max(seg, most)
        total = np.float32(0)
        for c in range(n):
            e = fast_exp(seg[c] - best)
            seg[c] = e
            total += e
        inv = np.float32(1) / total
        for c in range(n):
            seg[c] *= inv
        head = row[:a]
        for c in range(head.shape[0]):
            head[c] = 0
        tail = row[b:]
        for c in range(tail.shape[0]):
            tail[c] = 0


@njit(**SOFTMAX_OPTS, inline="always")
def span_max(seg, most):
    """max(seg) with len(most) running maxima side by side: a plain max loop does not vectorize."""
    n, lanes = seg.shape[0], most.shape[0]
    if n < lanes:
        best = seg[0]
        for c in range(1, n):
            best = seg[c] if seg[c] > best else best
        return best
    most[:] = seg[:lanes]
    full = n // lanes * lanes
    for c0 in range(lanes, full, lanes):
        chunk = seg[c0:c0 + lanes]
        for j in range(lanes):
            most[j] = chunk[j] if chunk[j] > most[j] else most[j]
    best = most[0]
    for j in range(1, lanes):
        best = most[j] if most[j] > best else best
    rest = seg[full:]
    for c in range(rest.shape[0]):
        best = rest[c] if rest[c] > best else best
    return best


@njit(**OPTS)
def gelu_erf(x, out):
    """Exact GELU x·Φ(x), with Φ(x) = erfc(-x/√2)/2 and erfc from Numerical Recipes' erfcc (relative
    error < 1.2e-7): within 2e-6 relative and 4e-7 absolute of the float64 value (measured), and it
    vectorizes, where math.erf is a scalar libm call (14 ns against 0.4 ns a value, measured)."""
    wide_vectors()
    for i in range(x.shape[0]):
        v = x[i]
        z = abs(v) * np.float32(0.7071067811865476)
        t = np.float32(1) / (np.float32(1) + np.float32(0.5) * z)
        p = t * np.float32(0.17087277) + np.float32(-0.82215223)
        p = t * p + np.float32(1.48851587)
        p = t * p + np.float32(-1.13520398)
        p = t * p + np.float32(0.27886807)
        p = t * p + np.float32(-0.18628806)
        p = t * p + np.float32(0.09678418)
        p = t * p + np.float32(0.37409196)
        p = t * p + np.float32(1.00002368)
        p = t * p + np.float32(-1.26551223)
        half_erfc = np.float32(0.5) * t * fast_exp(p - z * z)  # erfc(|v|/√2) / 2 = Φ(-|v|)
        out[i] = v * (half_erfc if v < 0 else np.float32(1) - half_erfc)
