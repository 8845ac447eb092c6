"""The scale searches of llama.cpp's quantizers (ggml-quants.c), ported operation by operation.

Every function here computes in float32 in the C code's order (no fastmath: LLVM may neither
reassociate sums nor fuse multiply-adds), so the encoders built on them write the same bytes as
llama.cpp's `ggml_quantize_chunk`. Integer stores into uint8/int8 arrays wrap as C's do (`& 0xFF`).
Literals are spelled np.float32(...) wherever a float meets an int: numba would otherwise widen the
expression to float64.
"""
from __future__ import annotations

import numpy as np
from numba import njit

OPTS = dict(cache=True, error_model="numpy", boundscheck=False, nogil=True)

GROUP_MAX_EPS = np.float32(1e-15)
# kvalues_iq4nl (ggml-common.h), as float32: every use in the C code converts them to float.
IQ4_LEVELS = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
# Every f16 bit pattern's float32 value (exact), for reading back a stored scale.
F16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(**OPTS)
def nearest_int(fval):
    """Round to the nearest integer (ties to even) with the 1.5 * 2**23 trick: the same bits as the
    C code even outside its asserted range (|fval| <= 4194303), where it returns garbage."""
    val = np.float32(fval + np.float32(12582912.0))
    return (np.int64(val.view(np.int32)) & 0x007FFFFF) - 0x00400000


@njit(**OPTS)
def wrap_i8(v):
    """An int stored into an int8_t."""
    return ((v + 128) & 0xFF) - 128


@njit(**OPTS)
def fp32_to_fp16(f):
    """ggml_compute_fp32_to_fp16 (round to nearest even, NaN -> 0x7E00 with its sign)."""
    f = np.float32(f)
    base = np.float32(np.float32(abs(f) * np.float32(2.0**112)) * np.float32(2.0**-110))
    w = np.uint32(f.view(np.uint32))
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    b = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))
    base = np.float32(b.view(np.float32) + base)
    bits = np.uint32(base.view(np.uint32))
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(**OPTS)
def put_f16(out, o, value):
    """Store float32 `value` as little-endian f16 at out[o:o+2]; returns the stored value as float32
    (what the C code reads back with GGML_FP16_TO_FP32)."""
    h = fp32_to_fp16(value)
    out[o] = np.uint8(h & np.uint16(0xFF))
    out[o + 1] = np.uint8(h >> np.uint16(8))
    return F16_VALUES[h]


@njit(**OPTS)
def abs_max(x, o, n):
    """The element of largest magnitude (the first on ties) and that magnitude."""
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[o + i])
        if ax > amax:
            amax = ax
            mx = x[o + i]
    return mx, amax


@njit(**OPTS)
def make_qx_quants(n, nmax, x, o, L, lo, qw, qo, has_qw):
    """make_qx_quants with rmse_type 1 (the only one the quantizers ported here use): weights
    qw[qo:] or x*x; codes L[lo:lo+n] in 0..2*nmax-1; returns the scale."""
    mx, amax = abs_max(x, o, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(-fnmax / mx)
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        xi = x[o + i]
        l = nearest_int(iscale * xi)
        l = max(-nmax, min(nmax - 1, l))
        L[lo + i] = l + nmax
        w = qw[qo + i] if has_qw else np.float32(xi * xi)
        fl = np.float32(l)
        sumlx += np.float32(np.float32(w * xi) * fl)
        suml2 += np.float32(np.float32(w * fl) * fl)
    scale = np.float32(sumlx / suml2) if suml2 != 0 else np.float32(0.0)
    best = np.float32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = np.float32(-np.float32(fnmax + np.float32(np.float32(0.1) * np.float32(step))) / mx)
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            xi = x[o + i]
            l = nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            w = qw[qo + i] if has_qw else np.float32(xi * xi)
            fl = np.float32(l)
            sumlx += np.float32(np.float32(w * xi) * fl)
            suml2 += np.float32(np.float32(w * fl) * fl)
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                l = nearest_int(iscale * x[o + i])
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(**OPTS)
def make_q3_quants(n, nmax, x, o, L, lo):
    """make_q3_quants with do_rmse (Q3_K without an importance matrix)."""
    mx, amax = abs_max(x, o, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-np.float32(nmax) / mx)
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        xi = x[o + i]
        l = nearest_int(iscale * xi)
        l = max(-nmax, min(nmax - 1, l))
        L[lo + i] = l
        w = np.float32(xi * xi)
        fl = np.float32(l)
        sumlx += np.float32(np.float32(w * xi) * fl)
        suml2 += np.float32(np.float32(w * fl) * fl)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[o + i]
            w = np.float32(xi * xi)
            li = np.float32(L[lo + i])
            slx = np.float32(sumlx - np.float32(np.float32(w * xi) * li))
            if slx > 0:
                sl2 = np.float32(suml2 - np.float32(np.float32(w * li) * li))
                new_l = nearest_int(np.float32(xi * sl2) / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[lo + i]:
                    fl = np.float32(new_l)
                    slx += np.float32(np.float32(w * xi) * fl)
                    sl2 += np.float32(np.float32(w * fl) * fl)
                    if sl2 > 0 and np.float32(np.float32(slx * slx) * suml2) > np.float32(
                            np.float32(sumlx * sumlx) * sl2):
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return np.float32(sumlx / suml2) if suml2 > 0 else np.float32(0.0)


@njit(**OPTS)
def make_qkx_quants(n, nmax, x, o, w, wo, L, lo, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants, and make_qkx3_quants given weights (they differ only where the weights
    are NULL or max < min, neither of which happens here). Returns (scale, the_min)."""
    mn = x[o]
    mx = x[o]
    sum_w = w[wo]
    sum_x = np.float32(sum_w * x[o])
    for i in range(1, n):
        xi = x[o + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = w[wo + i]
        sum_w += wi
        sum_x += np.float32(wi * xi)
    if mn > 0:
        mn = np.float32(0.0)
    if mx <= mn:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0), np.float32(-mn)
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / np.float32(mx - mn))
    scale = np.float32(np.float32(1.0) / iscale)
    best_error = np.float32(0.0)
    for i in range(n):
        xi = x[o + i]
        l = nearest_int(iscale * np.float32(xi - mn))
        l = max(0, min(nmax, l))
        L[lo + i] = l
        diff = np.float32(np.float32(np.float32(scale * np.float32(l)) + mn) - xi)
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best_error += np.float32(w[wo + i] * diff)
    if nstep < 1:
        return scale, np.float32(-mn)
    for step in range(nstep + 1):
        # mn moves to the best fit's min as the search goes, as in the C code
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step)))
                                       + fnmax) / np.float32(mx - mn))
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            xi = x[o + i]
            l = nearest_int(iscale * np.float32(xi - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            wi = w[wo + i]
            fl = np.float32(l)
            wl = np.float32(wi * fl)
            sum_l += wl
            sum_l2 += np.float32(wl * fl)
            sum_xl += np.float32(wl * xi)
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > 0:
            this_scale = np.float32(
                np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
            this_min = np.float32(
                np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = np.float32(sum_xl / sum_l2)
            cur_error = np.float32(0.0)
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(Laux[i]))
                                             + this_min) - x[o + i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur_error += np.float32(w[wo + i] * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, np.float32(-mn)


@njit(**OPTS)
def make_qp_quants(n, nmax, x, L, qw):
    """make_qp_quants: positive values x[:n] (sub-block scales or mins) to codes L (uint8, 0..nmax)
    weighted by qw; returns the scale."""
    mx = np.float32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / mx)
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = np.float32(np.float32(1.0) / iscale)
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = np.float32(x[i] - np.float32(scale * np.float32(L[i])))
        best_mse += np.float32(np.float32(qw[i] * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = np.float32(np.float32(np.float32(np.float32(0.1) * np.float32(step)) + fnmax) / mx)
        scale_is = np.float32(np.float32(1.0) / iscale_is)
        mse = np.float32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = np.float32(x[i] - np.float32(scale_is * np.float32(l)))
            mse += np.float32(np.float32(qw[i] * diff) * diff)
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        fl = np.float32(l)
        sumlx += np.float32(np.float32(qw[i] * x[i]) * fl)
        suml2 += np.float32(np.float32(qw[i] * fl) * fl)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = np.float32(L[i])
            slx = np.float32(sumlx - np.float32(np.float32(w * x[i]) * li))
            sl2 = np.float32(suml2 - np.float32(np.float32(w * li) * li))
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(np.float32(x[i] * sl2) / slx))
                if new_l != L[i]:
                    fl = np.float32(new_l)
                    slx += np.float32(np.float32(w * x[i]) * fl)
                    sl2 += np.float32(np.float32(w * fl) * fl)
                    if np.float32(np.float32(slx * slx) * suml2) > np.float32(
                            np.float32(sumlx * sumlx) * sl2):
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return np.float32(sumlx / suml2) if suml2 > 0 else np.float32(0.0)


@njit(**OPTS)
def best_index_int8(val, x):
    """best_index_int8 over the 16 sorted levels `val` (float32): the nearest one, the lower on ties."""
    n = len(val)
    if x <= val[0]:
        return 0
    if x >= val[n - 1]:
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu
