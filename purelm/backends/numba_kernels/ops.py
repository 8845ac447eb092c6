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
from .intrinsics import bits_to_float, half_to_float, key_dots16, load_f16, prefetch, tile4x32, value_axpy16, wide_vectors

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
AHEAD = 16  # key rows paged attention prefetches ahead of the 16 it works on


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
def paged_item(q, keys, values, tables, pos, shift, t, c, kv0, kv1, chunk, scale, softcap, window, slopes,
               part_max, part_sum, part_out, slot, scratch):
    """One work item of paged attention: token t's query heads of KV heads kv0..kv1-1, over the key
    positions of chunk c (c*chunk .. up to the token's own position, within its window). Leaves the
    softmax partials (max, total, weighted sum of values) of each head h in part_*[slot, h]. A
    position p lives in row tables[t, p >> shift] << shift | p & mask of the pools. Rows go 16 at a
    time, all the item's KV heads of each row in turn (a row's heads lie side by side in the pools:
    the reads run along memory), each head's keys and values read once for the query heads sharing
    it (GQA), through flat views of the pools. The pools may be float32, f16 bits (uint16) or q8_0
    bytes (int8): key_dots16 and value_axpy16 read each type. A head's sums never depend on the other
    heads of its item, so any split of the KV heads into items gives the same bits. `scratch`:
    paged_scratch's arrays, overwritten (allocated once per thread, not per item)."""
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
    # Each position's row as its element offset in the flat pools; the last 16 rows repeat the last
    # one as needed (their scores unused, their weights 0), and AHEAD more for the prefetch to read.
    n16 = (n + 15) // 16 * 16
    k_rows, v_rows, qg, scores, acc = scratch
    for s in range(n16 + AHEAD):
        p = a + min(s, n - 1)
        row = (np.int64(tables[t, p >> shift]) << shift) | (p & mask)
        k_rows[s] = row * n_kv * k_width
        if s < n16:
            v_rows[s] = row * n_kv * v_width
    h0, n_h = kv0 * group, (kv1 - kv0) * group  # the item's query heads: h0 + hi, hi < n_h
    for hi in range(n_h):  # their queries, scaled
        for i in range(dim):
            qg[hi * dim + i] = q[t, h0 + hi, i] * scale
    # Head sizes that are not multiples of 16: the last dim % 16 values row by row (f32 and f16; a
    # q8_0 row holds whole blocks of 32)
    k16, v16 = dim // 16 * 16, v_dim // 16 * 16
    k_line, v_line = 64 // kf.itemsize, 64 // vf.itemsize  # a cache line's elements
    for s in range(0, n16, 16):  # scores: head hi's at hi * n16
        # the pools come from memory: the hardware prefetcher alone leaves this loop waiting on them
        for j in range(s + AHEAD, s + AHEAD + 16):
            for e in range(kv0 * k_width, kv1 * k_width, k_line):
                prefetch(kf, k_rows[j] + e)
        for kv in range(kv0, kv1):
            for gi in range(group):
                hi = (kv - kv0) * group + gi
                key_dots16(scores, hi * n16 + s, qg, hi * dim, kf, k_rows, s, kv * k_width, dim // 16)
                if k16 < dim:
                    for j in range(16):
                        scores[hi * n16 + s + j] += row_dot(qg, hi * dim + k16, kf, k_rows[s + j] + kv * k_width + k16,
                                                            dim - k16)
    for hi in range(n_h):
        h = h0 + hi
        sc = scores[hi * n16:hi * n16 + n]
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
        for s in range(hi * n16 + n, hi * n16 + n16):
            scores[s] = 0
        part_max[slot, h] = best
        part_sum[slot, h] = total
    for i in range(n_h * v_dim):
        acc[i] = 0
    for s in range(0, n16, 16):
        for j in range(s + AHEAD, min(s + AHEAD + 16, n16)):
            for e in range(kv0 * v_width, kv1 * v_width, v_line):
                prefetch(vf, v_rows[j] + e)
        for kv in range(kv0, kv1):
            for gi in range(group):
                hi = (kv - kv0) * group + gi
                value_axpy16(acc, hi * v_dim, scores, hi * n16 + s, vf, v_rows, s, kv * v_width, v_dim // 16)
                if v16 < v_dim:
                    for j in range(16):
                        row_axpy(acc, hi * v_dim + v16, scores[hi * n16 + s + j], vf, v_rows[s + j] + kv * v_width + v16,
                                 v_dim - v16)
    for hi in range(n_h):
        for i in range(v_dim):
            part_out[slot, h0 + hi, i] = acc[hi * v_dim + i]


@njit(**SOFTMAX_OPTS, inline="always")
def paged_scratch(q, keys, values, chunk):
    """One thread's working arrays for paged_item: key and value row offsets, the scaled queries of
    every head, their scores, their weighted values."""
    n_head, dim, v_dim = q.shape[1], row_values(keys), row_values(values)
    n16 = (chunk + 15) // 16 * 16
    return (np.empty(n16 + AHEAD, np.int64), np.empty(n16, np.int64), np.empty(n_head * dim, np.float32),
            np.empty(n_head * n16, np.float32), np.empty(n_head * v_dim, np.float32))


@njit(**SOFTMAX_OPTS, inline="always")
def paged_check(q, keys, values, tables, pos, shift, chunk, out):
    """The paged kernels' entry check: query heads that share the KV heads evenly, head sizes and
    the output as the pools have them, and every block a token reads up to its position inside the
    pools."""
    n_tok, n_head, dim = q.shape
    n_kv, n_rows = keys.shape[1], keys.shape[0]
    assert n_kv > 0 and n_head % n_kv == 0 and values.shape[0] == n_rows and values.shape[1] == n_kv
    assert row_values(keys) == dim and chunk > 0 and 0 <= shift < 31
    assert pos.shape[0] == n_tok and tables.shape[0] == n_tok
    assert out.shape[0] == n_tok and out.shape[1] == n_head * row_values(values)
    for t in range(n_tok):
        assert 0 <= pos[t] and (pos[t] >> shift) < tables.shape[1]
        for blk in range((pos[t] >> shift) + 1):
            assert 0 <= tables[t, blk] and (np.int64(tables[t, blk]) + 1) << shift <= n_rows


@njit(**SOFTMAX_OPTS)
def paged_work(q, values, pos, chunk, n_kv, n_workers):
    """The work items of paged attention for `n_workers`, per token, per chunk of `chunk` positions up
    to its own, and per KV head where there are fewer than two tokens and chunks a worker (one
    sequence's decode step on several threads: fewer, uneven splits would leave a thread waiting),
    and room for their softmax partials, a slot per token and chunk: returns (first slot of each
    token, then each item's token, chunk, first and end KV head, slot; the partials)."""
    n_tok = pos.shape[0]
    first = np.empty(n_tok + 1, np.int64)
    first[0] = 0
    for t in range(n_tok):
        first[t + 1] = first[t] + pos[t] // chunk + 1
    n_slots = first[n_tok]
    kv_split = 1 if n_workers == 1 or n_slots >= 2 * n_workers else n_kv
    n = n_slots * kv_split
    items = np.empty((5, n), np.int64)
    i = 0
    for t in range(n_tok):
        for c in range(first[t + 1] - first[t]):
            for r in range(kv_split):
                items[0, i], items[1, i], items[4, i] = t, c, first[t] + c
                items[2, i], items[3, i] = r * n_kv // kv_split, (r + 1) * n_kv // kv_split
                i += 1
    n_head, v_dim = q.shape[1], row_values(values)
    part_max = np.full((n_slots, n_head), -np.inf, np.float32)
    part_sum = np.zeros((n_slots, n_head), np.float32)
    part_out = np.zeros((n_slots, n_head, v_dim), np.float32)
    return first, items, part_max, part_sum, part_out


@njit(**SOFTMAX_OPTS)
def paged_combine(first, pos, chunk, part_max, part_sum, part_out, out):
    """out[t, h*Dv:] from the partials of token t's chunks (the same order whoever ran the items)."""
    n_head, v_dim = part_out.shape[1], part_out.shape[2]
    for t in range(pos.shape[0]):
        n_chunks = pos[t] // chunk + 1
        base = first[t]
        for h in range(n_head):
            best = part_max[base, h]
            for c in range(1, n_chunks):
                best = max(best, part_max[base + c, h])
            total = np.float32(0)
            for i in range(v_dim):
                out[t, h * v_dim + i] = 0
            for c in range(n_chunks):
                if part_sum[base + c, h] == 0:
                    continue  # a chunk the window left empty
                w = fast_exp(part_max[base + c, h] - best)
                total += w * part_sum[base + c, h]
                for i in range(v_dim):
                    out[t, h * v_dim + i] += w * part_out[base + c, h, i]
            inv = np.float32(1) / total
            for i in range(v_dim):
                out[t, h * v_dim + i] *= inv


@njit(**SOFTMAX_OPTS)
def paged_share(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, items,
                part_max, part_sum, part_out, w, n_workers):
    """Worker w's work items of paged attention, items w, w + n_workers, ... (neighbouring items are
    one token's chunks and heads, alike in size), with its own scratch arrays. One compiled function
    for both kernels: the serial one and each thread of the parallel one run the same code, so a
    token's bits never depend on the thread count (and the parallel kernel's own compile stays small)."""
    wide_vectors()
    scratch = paged_scratch(q, keys, values, chunk)
    for i in range(w, items.shape[1], n_workers):
        paged_item(q, keys, values, tables, pos, shift, items[0, i], items[1, i], items[2, i], items[3, i], chunk,
                   scale, softcap, window, slopes, part_max, part_sum, part_out, items[4, i], scratch)


@njit(**SOFTMAX_OPTS)
def attention_paged(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, out):
    """Attention of tokens at positions `pos` (any sequences: token t's blocks are tables[t]) over
    their cached keys and values, serially: a "split-K" work item per (token, chunk of positions)
    reads each key and value row once for all the query heads sharing it (GQA). Each token's result
    depends on its own query, positions and chunks only, not on the other tokens or the thread
    count: attention_paged_parallel computes the same sums on numba's threads."""
    paged_check(q, keys, values, tables, pos, shift, chunk, out)
    first, items, part_max, part_sum, part_out = paged_work(q, values, pos, chunk, keys.shape[1], np.int64(1))
    paged_share(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, items, part_max,
                part_sum, part_out, np.int64(0), np.int64(1))  # (typed as the parallel kernel's)
    paged_combine(first, pos, chunk, part_max, part_sum, part_out, out)


@njit(**SOFTMAX_PARALLEL)
def attention_paged_parallel(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, n_workers,
                             out):
    """attention_paged with the work items shared out over `n_workers` (numba's threads): the same
    results (paged_work shares the work out)."""
    paged_check(q, keys, values, tables, pos, shift, chunk, out)
    n_workers = max(1, n_workers)
    first, items, part_max, part_sum, part_out = paged_work(q, values, pos, chunk, keys.shape[1], n_workers)
    n_workers = min(items.shape[1], n_workers)
    for w in prange(n_workers):
        paged_share(q, keys, values, tables, pos, shift, scale, softcap, window, slopes, chunk, items, part_max,
                    part_sum, part_out, np.int64(w), n_workers)
    paged_combine(first, pos, chunk, part_max, part_sum, part_out, out)


@njit(**OPTS)
def hadamard_rows(x, scale, out):
    """out = each row of x (R, n), n a power of two, times the orthonormal Hadamard matrix of size n
    (Sylvester's order, kv_cache.hadamard): the fast Walsh-Hadamard transform's n log n additions, its
    first three stages written out for each run of 8 values (loops of 1, 2 and 4 pairs do not
    vectorize), then `scale` (1/sqrt(n)). No BLAS: a numpy product inside a pass woke BLAS's threads,
    whose spinning took the cores from the other kernels. Each row alone, in one order, whatever rows
    share the call."""
    wide_vectors()
    n = x.shape[1]
    for r in range(x.shape[0]):
        xr, o = x[r], out[r]
        h = 1
        if n >= 8:
            h = 8
            for i in range(0, n, 8):
                i = at(i)
                b0, b1 = xr[i] + xr[i + 1], xr[i] - xr[i + 1]
                b2, b3 = xr[i + 2] + xr[i + 3], xr[i + 2] - xr[i + 3]
                b4, b5 = xr[i + 4] + xr[i + 5], xr[i + 4] - xr[i + 5]
                b6, b7 = xr[i + 6] + xr[i + 7], xr[i + 6] - xr[i + 7]
                c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
                c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
                o[i], o[i + 1], o[i + 2], o[i + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
                o[i + 4], o[i + 5], o[i + 6], o[i + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7
        else:
            for i in range(n):
                o[i] = xr[i]
        while h < n:
            for i in range(0, n, 2 * h):
                for j in range(i, i + h):
                    a, b = o[at(j)], o[at(j + h)]
                    o[at(j)], o[at(j + h)] = a + b, a - b
            h *= 2
        for i in range(n):
            o[i] *= scale


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
def attention_prompt(q, keys, values, p0, scale, softcap, window, slopes, lanes, out, causal=True):
    """Causal attention of a prompt chunk (tokens at positions p0, p0 + 1, ...) over keys and values
    (n_keys, n_kv, dim) of positions 0.., as blocked matrix products (tile4x32) with the masked softmax
    (softmax_rows) between them. A work item is one KV head and PROMPT_TILE query tokens: its rows are
    those tokens' query heads sharing the KV head (GQA), and it reads only the keys they may see: with
    `causal` False every key up to the chunk's last one (each query masked as the last query is)."""
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
        seen = p0 + t1 if causal else p0 + n_tok  # keys 0 .. seen - 1
        n = (seen - k0 + 31) // 32 * 32
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
        if not causal:  # the padding past the last key: no weight (the rows' positions run past it)
            for r in range(rows):
                for c in range(seen - k0, n):
                    scores[r, c] = -np.inf
        softmax_rows(scores[:rows], p0 + t0 if causal else seen - 1, group, k0, softcap, window, slopes, h * group,
                     lanes)
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


def as_float(v):
    """v as float32: a uint16 as the f16 number of its bits, a float32 as it is."""


@overload(as_float, inline="always")
def _as_float(v):
    if v == types.uint16:
        return lambda v: half_to_float(v)
    return lambda v: np.float32(v)


@njit(**OPTS, inline="always")
def _lora_row(x, a_t, bt, factor, y, out, i, t):
    n_in, r = a_t.shape
    n_out = bt.shape[1]
    t[:] = 0
    for k in range(n_in):  # t = x·A, a column of A at a time: each t[j] sums in the order of k
        xk = x[i, k]
        for j in range(r):
            t[j] += xk * as_float(a_t[k, j])
    for c in range(n_out):
        out[i, c] = y[i, c]
    for j in range(r):
        tj = t[j] * factor
        for c in range(n_out):
            out[i, c] += tj * as_float(bt[j, c])


@njit(**OPTS)
def lora_rows(x, a_t, bt, factor, y, out):
    """out = y + factor·(x·Aᵀ)·Bᵀ for a_t = Aᵀ (in, rank) and bt = Bᵀ (rank, out), float32 or f16 bits
    (uint16), a row at a time in the same order whatever the row count: a decode token's bits do not
    depend on its batch."""
    t = np.empty(a_t.shape[1], np.float32)
    for i in range(x.shape[0]):
        _lora_row(x, a_t, bt, factor, y, out, i, t)


@njit(**dict(OPTS, parallel=True))
def lora_rows_parallel(x, a_t, bt, factor, y, out):
    """lora_rows with the rows shared among the threads (each row computed as lora_rows does)."""
    for i in prange(x.shape[0]):
        t = np.empty(a_t.shape[1], np.float32)
        _lora_row(x, a_t, bt, factor, y, out, i, t)
