"""Everything but the matrix products: norms, rotary embedding, attention with its KV-cache write, and
activations. One compiled call per op replaces several numpy calls (each ~1-5 us of dispatch).

exp is computed inline (`fast_exp`: Cephes' expf polynomial, within 1.2e-7 relative of np.exp on its
range) because numba without SVML calls libm's scalar expf: 2.5 ns against 0.3 ns per value (measured),
in softmax and SwiGLU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .common import OPTS, SOFTMAX_OPTS, SOFTMAX_PARALLEL
from .intrinsics import bits_to_float, wide_vectors

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


@njit(**OPTS)
def store_kv(k, v, keys, values, p0):
    """Write this step's keys and values into the cache at positions p0..p0+T-1."""
    for t in range(k.shape[0]):
        for h in range(k.shape[1]):
            for i in range(k.shape[2]):
                keys[p0 + t, h, i] = k[t, h, i]
            for i in range(v.shape[2]):
                values[p0 + t, h, i] = v[t, h, i]


@njit(**SOFTMAX_OPTS, inline="always")
def attend_one(q, keys, values, p0, scale, softcap, window, slopes, t, h, kv, scores, out):
    """Softmax attention of query (t, h) over cached positions [lo, p0 + t]; writes out[t, h*Dv:].
    One simple pass per step (scores, caps, max, exp, weighted sum): fused into one loop, LLVM
    vectorized none of it (3x slower)."""
    dim = q.shape[2]
    v_dim = values.shape[2]
    pos = p0 + t
    lo = max(0, pos - window + 1) if window > 0 else 0
    n = pos + 1 - lo
    for s in range(n):
        acc = np.float32(0)
        for i in range(dim):
            acc += q[t, h, i] * keys[lo + s, kv, i]
        scores[s] = acc * scale
    if softcap > 0:
        for s in range(n):
            scores[s] = np.float32(math.tanh(scores[s] / softcap)) * softcap
    if slopes.shape[0] > 0:
        slope = slopes[h]
        for s in range(n):
            scores[s] += slope * np.float32(lo + s)
    best = scores[0]
    for s in range(1, n):
        best = max(best, scores[s])
    total = np.float32(0)
    for s in range(n):
        e = fast_exp(scores[s] - best)
        scores[s] = e
        total += e
    o = out[t, h * v_dim:(h + 1) * v_dim]
    o[:] = 0
    for s in range(n):
        p = scores[s]
        for i in range(v_dim):
            o[i] += p * values[lo + s, kv, i]
    inv = np.float32(1) / total
    for i in range(v_dim):
        o[i] *= inv


@njit(**SOFTMAX_OPTS)
def attention(q, keys, values, p0, scale, softcap, window, slopes, first, last, out):
    """Attention for the (token, head) pairs first..last-1 (pair = t * H + h); serial, for callers
    that split the work across their own threads or have little of it."""
    n_head = q.shape[1]
    group = n_head // keys.shape[1]
    wide_vectors()
    scores = np.empty(p0 + q.shape[0], np.float32)
    for th in range(first, last):
        t, h = th // n_head, th % n_head
        attend_one(q, keys, values, p0, scale, softcap, window, slopes, t, h, h // group, scores, out)


@njit(**SOFTMAX_PARALLEL)
def attention_parallel(q, keys, values, p0, scale, softcap, window, slopes, chunk, out):
    """Decode attention over a long context, spread over numba's threads ("split-K"): a work item is
    (token, KV head, run of `chunk` key positions). It reads each cached key and value row once for
    all query heads sharing that KV head (GQA), and leaves its softmax partial sums (max, total, and
    the weighted sum of values); the partials of a query's runs are combined at the end."""
    n_tok, n_head, dim = q.shape
    n_kv, v_dim = keys.shape[1], values.shape[2]
    group = n_head // n_kv
    n_chunks = -(-(p0 + n_tok) // chunk)
    part_max = np.full((n_tok, n_head, n_chunks), -np.inf, np.float32)
    part_sum = np.zeros((n_tok, n_head, n_chunks), np.float32)
    part_out = np.zeros((n_tok, n_head, n_chunks, v_dim), np.float32)
    for item in prange(n_tok * n_kv * n_chunks):
        wide_vectors()
        t = item // (n_kv * n_chunks)
        kv = item // n_chunks % n_kv
        c = item % n_chunks
        pos = p0 + t
        lo = max(0, pos - window + 1) if window > 0 else 0
        a, b = max(lo, c * chunk), min(pos + 1, (c + 1) * chunk)
        if a >= b:
            continue
        n = b - a
        h0 = kv * group
        scores = np.empty((group, n), np.float32)
        acc = np.zeros((group, v_dim), np.float32)
        # direct indexing, no row views: each view costs a reference-count update per key
        for s in range(n):
            for gi in range(group):
                dot = np.float32(0)
                for i in range(dim):
                    dot += q[t, h0 + gi, i] * keys[a + s, kv, i]
                scores[gi, s] = dot * scale
        for gi in range(group):
            h = h0 + gi
            if softcap > 0:
                for s in range(n):
                    scores[gi, s] = np.float32(math.tanh(scores[gi, s] / softcap)) * softcap
            if slopes.shape[0] > 0:
                for s in range(n):
                    scores[gi, s] += slopes[h] * np.float32(a + s)
            best = scores[gi, 0]
            for s in range(1, n):
                best = scores[gi, s] if scores[gi, s] > best else best
            total = np.float32(0)
            for s in range(n):
                e = fast_exp(scores[gi, s] - best)
                scores[gi, s] = e
                total += e
            part_max[t, h, c] = best
            part_sum[t, h, c] = total
        for s in range(n):
            for gi in range(group):
                p = scores[gi, s]
                for i in range(v_dim):
                    acc[gi, i] += p * values[a + s, kv, i]
        for gi in range(group):
            for i in range(v_dim):
                part_out[t, h0 + gi, c, i] = acc[gi, i]
    for t in range(n_tok):
        for h in range(n_head):
            best = part_max[t, h, 0]
            for c in range(1, n_chunks):
                best = max(best, part_max[t, h, c])
            total = np.float32(0)
            for i in range(v_dim):
                out[t, h * v_dim + i] = 0
            for c in range(n_chunks):
                if part_sum[t, h, c] == 0:
                    continue  # a run the window or the causal mask left empty
                w = fast_exp(part_max[t, h, c] - best)
                total += w * part_sum[t, h, c]
                for i in range(v_dim):
                    out[t, h * v_dim + i] += w * part_out[t, h, c, i]
            inv = np.float32(1) / total
            for i in range(v_dim):
                out[t, h * v_dim + i] *= inv


@njit(**OPTS)
def swiglu(gate, up, out):
    """silu(gate) * up, elementwise over (tokens, n) arrays (rows may be strided)."""
    wide_vectors()
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1) + fast_exp(-g)) * up[t, i]


@njit(**OPTS)
def geglu(gate, up, out):
    """gelu(gate) * up (gelu as in `gelu`), over (tokens, n) arrays (rows may be strided)."""
    wide_vectors()
    c = np.float32(2 * 0.7978845608028654)
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            v = gate[t, i]
            y2 = c * (v + np.float32(0.044715) * v * v * v)
            out[t, i] = v / (np.float32(1) + fast_exp(-y2)) * up[t, i]


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


@njit(**SOFTMAX_OPTS)
def softmax_rows(scores, pos0, group, k0, softcap, window, slopes, head0, lanes):
    """Turn (already scaled) q.k scores into attention weights in place, for prefill's BLAS attention.

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
