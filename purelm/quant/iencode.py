"""IQ4_NL / IQ4_XS encoders and the legacy 32-weight types with an importance matrix, byte-identical
to llama.cpp's (quantize_row_iq4_nl_impl with ntry 7, as `quantize_iq4_nl`/`quantize_iq4_xs` call it
with or without weights; quantize_row_q4_0_impl ... quantize_row_q5_1_impl). Legacy types without
an importance matrix are legacy.py's numpy encoders.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .kencode import imatrix_weights, sum_squares
from .search import (
    GROUP_MAX_EPS, IQ4_LEVELS, OPTS, abs_max, best_index_int8, make_qkx_quants, make_qx_quants,
    nearest_int, put_f16,
)

NTRY = 7


@njit(**OPTS)
def iq4_block(x, xo, qw, has_qw, y, yo, sb, L, w, scales):
    """One super-block of sb weights (32: IQ4_NL, 256: IQ4_XS) in sub-blocks of 32."""
    v = IQ4_LEVELS
    nb = sb // 32
    sigma2 = np.float32(sum_squares(x, xo, sb) * np.float32(np.float32(2.0) / np.float32(sb)))
    amax_scale = np.float32(0.0)
    max_scale = np.float32(0.0)
    for ib in range(nb):
        o = xo + 32 * ib
        if has_qw:
            imatrix_weights(x, o, qw, 32, sigma2, w)
        else:
            for j in range(32):
                w[j] = np.float32(x[o + j] * x[o + j])
        mx, amax = abs_max(x, o, 32)
        if amax < GROUP_MAX_EPS:
            scales[ib] = 0
            continue
        d = np.float32(-mx / v[0])
        iscale = np.float32(np.float32(1.0) / d)
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for j in range(32):
            xj = x[o + j]
            l = best_index_int8(v, np.float32(iscale * xj))
            L[32 * ib + j] = l
            q = v[l]
            sumqx += np.float32(np.float32(w[j] * q) * xj)
            sumq2 += np.float32(np.float32(w[j] * q) * q)
        d = np.float32(sumqx / sumq2) if sumq2 > 0 else np.float32(0.0)
        best = np.float32(d * sumqx)
        for itry in range(-NTRY, NTRY + 1):
            iscale = np.float32(np.float32(itry - 127) / mx)  # (itry + values[0]) / max
            sumqx = np.float32(0.0)
            sumq2 = np.float32(0.0)
            for j in range(32):
                xj = x[o + j]
                q = v[best_index_int8(v, np.float32(iscale * xj))]
                sumqx += np.float32(np.float32(w[j] * q) * xj)
                sumq2 += np.float32(np.float32(w[j] * q) * q)
            if sumq2 > 0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
                d = np.float32(sumqx / sumq2)
                best = np.float32(d * sumqx)
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nb > 1:
        d = np.float32(-max_scale / np.float32(32.0))
        put_f16(y, yo, d)
        iscale = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        y[yo + 2] = 0
        y[yo + 3] = 0
        for ib in range(nb):
            l = max(-32, min(31, nearest_int(iscale * scales[ib])))
            dl = np.float32(d * np.float32(l))
            idl = np.float32(np.float32(1.0) / dl) if dl != 0 else np.float32(0.0)
            for j in range(32):
                L[32 * ib + j] = best_index_int8(v, np.float32(idl * x[xo + 32 * ib + j]))
            l += 32
            if ib % 2 == 0:
                y[yo + 4 + ib // 2] = l & 0xF
            else:
                y[yo + 4 + ib // 2] |= (l & 0xF) << 4
            y[yo + 2 + ib // 4] |= ((l >> 4) << (2 * (ib % 4))) & 0xFF  # uint16 scales_h, LE
        qo = yo + 8
    else:
        put_f16(y, yo, scales[0])
        iscale = np.float32(np.float32(1.0) / scales[0]) if scales[0] != 0 else np.float32(0.0)
        for j in range(32):
            L[j] = best_index_int8(v, np.float32(iscale * x[xo + j]))
        qo = yo + 2
    for i in range(nb):
        for j in range(16):
            y[qo + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(**OPTS)
def iq4_row(x, qw, has_qw, y, sb):
    L = np.zeros(sb, np.uint8)
    w = np.empty(32, np.float32)
    scales = np.empty(sb // 32, np.float32)
    size = 18 if sb == 32 else 136
    for i in range(len(x) // sb):
        iq4_block(x, sb * i, qw, has_qw, y, size * i, sb, L, w, scales)


@njit(**OPTS)
def legacy_row(x, qw, y, nmax, with_min):
    """Q4_0 (nmax 8) / Q5_0 (16) via make_qx_quants, Q4_1 (15) / Q5_1 (31) via make_qkx3_quants,
    weights qw * sqrt(sigma2 + x*x) with sigma2 the mean square of the whole row."""
    n = len(x)
    sigma2 = np.float32(sum_squares(x, 0, n) / np.float32(n))
    w = np.empty(32, np.float32)
    L = np.zeros(32, np.uint8)
    Lq = np.zeros(32, np.int8)
    Laux = np.empty(32, np.uint8)
    five = nmax >= 16
    size = 18 + 2 * with_min + 4 * five
    for ib in range(n // 32):
        o = 32 * ib
        yo = size * ib
        imatrix_weights(x, o, qw, 32, sigma2, w)
        if with_min:
            d, mn = make_qkx_quants(32, nmax, x, o, w, 0, L, 0, Laux,
                                    np.float32(-0.9), np.float32(0.05), 36, False)
            put_f16(y, yo, d)
            put_f16(y, yo + 2, np.float32(-mn))
        else:
            d = make_qx_quants(32, nmax, x, o, Lq, 0, w, 0, True)
            put_f16(y, yo, d)
            for j in range(32):
                L[j] = Lq[j]
        qs = yo + 2 + 2 * with_min + 4 * five
        for j in range(16):
            y[qs + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)
        if five:
            qh = yo + 2 + 2 * with_min
            for k in range(4):
                bits = 0
                for b in range(8):
                    bits |= ((L[8 * k + b] >> 4) & 1) << b
                y[qh + k] = bits
