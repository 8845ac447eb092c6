"""K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), byte-identical to llama.cpp's.

Each `*_row` encodes one row of float32 weights `x` into its bytes `y`, as `ggml_quantize_chunk`
does: without an importance matrix the `quantize_row_*_ref` functions, with one (`qw`, a weight per
column, `has_qw`) the `quantize_row_*_impl` functions of ggml-quants.c. Offsets inside a block
follow the block_q*_K structs of ggml-common.h.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .search import (
    GROUP_MAX_EPS, OPTS, make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants,
    nearest_int, put_f16, wrap_i8,
)

QK = 256


@njit(**OPTS)
def sum_squares(x, o, n):
    s = np.float32(0.0)
    for i in range(n):
        s += np.float32(x[o + i] * x[o + i])
    return s


@njit(**OPTS)
def imatrix_weights(x, o, qw, n, sigma2, w):
    """w = qw * sqrtf(sigma2 + x*x), the weighting every *_impl quantizer uses."""
    for i in range(n):
        w[i] = np.float32(qw[o + i] * np.sqrt(np.float32(sigma2 + np.float32(x[o + i] * x[o + i]))))


@njit(**OPTS)
def pack_2bit(L, y, o):
    """Four 2-bit codes a byte: byte l of each 32-byte half takes weights l, l+32, l+64, l+96."""
    for j in range(0, QK, 128):
        for l in range(32):
            y[o + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                 | (L[j + l + 96] << 6)) & 0xFF


# --- Q2_K: scales[16] | qs[64] | d | dmin ---------------------------------------------------------

@njit(**OPTS)
def q2_k_row(x, qw, has_qw, y):
    L = np.zeros(QK, np.uint8)
    Laux = np.empty(16, np.uint8)
    w = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.uint8)
    Lm = np.empty(16, np.uint8)
    for i in range(len(x) // QK):
        xo = QK * i
        yo = 84 * i
        if has_qw:
            sigma2 = np.float32(sum_squares(x, xo, QK) / np.float32(QK))
            for j in range(16):
                imatrix_weights(x, xo + 16 * j, qw, 16, sigma2, w)
                s = np.float32(0.0)
                for l in range(16):
                    s += w[l]
                sw[j] = s
                scales[j], mins[j] = make_qkx_quants(
                    16, 3, x, xo + 16 * j, w, 0, L, 16 * j, Laux,
                    np.float32(-0.9), np.float32(0.05), 36, False)
            dm = make_qp_quants(16, 15, scales, Ls, sw)
            mm = make_qp_quants(16, 15, mins, Lm, sw)
            d = put_f16(y, yo + 80, dm)
            dmin = put_f16(y, yo + 82, mm)
            for j in range(16):
                y[yo + j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
        else:
            max_scale = np.float32(0.0)
            max_min = np.float32(0.0)
            for j in range(16):
                for l in range(16):
                    w[l] = abs(x[xo + 16 * j + l])
                scales[j], mins[j] = make_qkx_quants(
                    16, 3, x, xo + 16 * j, w, 0, L, 16 * j, Laux,
                    np.float32(-0.5), np.float32(0.1), 15, True)
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            if max_scale > 0:
                iscale = np.float32(np.float32(15.0) / max_scale)
                for j in range(16):
                    y[yo + j] = nearest_int(iscale * scales[j]) & 0xFF
                d = put_f16(y, yo + 80, np.float32(max_scale / np.float32(15.0)))
            else:
                for j in range(16):
                    y[yo + j] = 0
                d = put_f16(y, yo + 80, np.float32(0.0))
            if max_min > 0:
                iscale = np.float32(np.float32(15.0) / max_min)
                for j in range(16):
                    y[yo + j] = (y[yo + j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
                dmin = put_f16(y, yo + 82, np.float32(max_min / np.float32(15.0)))
            else:
                dmin = put_f16(y, yo + 82, np.float32(0.0))
        for j in range(16):
            sc = np.int64(y[yo + j])
            dl = np.float32(d * np.float32(sc & 0xF))
            if dl == 0:
                continue
            ml = np.float32(dmin * np.float32(sc >> 4))
            for ii in range(16):
                l = nearest_int(np.float32(x[xo + 16 * j + ii] + ml) / dl)
                L[16 * j + ii] = max(0, min(3, l))
        pack_2bit(L, y, yo + 16)


# --- Q3_K: hmask[32] | qs[64] | scales[12] (6-bit, split 4 + 2) | d -------------------------------

@njit(**OPTS)
def q3_k_put_scale(y, so, j, l):
    """Store 6-bit code l (0..63) of sub-block j into the 12 scale bytes at y[so:]."""
    if j < 8:
        y[so + j] = l & 0xF
    else:
        y[so + j - 8] |= (l & 0xF) << 4
    y[so + j % 4 + 8] |= ((l >> 4) << (2 * (j // 4))) & 0xFF


@njit(**OPTS)
def q3_k_row(x, qw, has_qw, y):
    L = np.zeros(QK, np.int8)
    w = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int8)
    for i in range(len(x) // QK):
        xo = QK * i
        yo = 110 * i
        so = yo + 96
        for k in range(12):
            y[so + k] = 0
        if has_qw:
            sigma2 = np.float32(np.float32(np.float32(2.0) * sum_squares(x, xo, QK)) / np.float32(QK))
            for j in range(16):
                imatrix_weights(x, xo + 16 * j, qw, 16, sigma2, w)
                s = np.float32(0.0)
                for l in range(16):
                    s += w[l]
                sw[j] = s
                scales[j] = make_qx_quants(16, 4, x, xo + 16 * j, L, 16 * j, w, 0, True)
            d_block = make_qx_quants(16, 32, scales, 0, Ls, 0, sw, 0, True)
            for j in range(16):
                q3_k_put_scale(y, so, j, np.int64(Ls[j]))
            d = put_f16(y, yo + 108, d_block)
        else:
            max_scale = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(16):
                scales[j] = make_q3_quants(16, 4, x, xo + 16 * j, L, 16 * j)
                a = abs(scales[j])
                if a > amax:
                    amax = a
                    max_scale = scales[j]
            if max_scale != 0:
                iscale = np.float32(np.float32(-32.0) / max_scale)
                for j in range(16):
                    l = wrap_i8(nearest_int(iscale * scales[j]))
                    q3_k_put_scale(y, so, j, max(-32, min(31, l)) + 32)
                d = put_f16(y, yo + 108, np.float32(np.float32(1.0) / iscale))
            else:
                d = put_f16(y, yo + 108, np.float32(0.0))
        for j in range(16):
            sc = (np.int64(y[so + j]) & 0xF) if j < 8 else (np.int64(y[so + j - 8]) >> 4)
            sc = (sc | (((np.int64(y[so + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dl = np.float32(d * np.float32(sc))
            if dl == 0:
                continue
            for ii in range(16):
                l = nearest_int(x[xo + 16 * j + ii] / dl)
                L[16 * j + ii] = max(-4, min(3, l)) + 4
        # The high bit of weight j goes to bit j // 32 of hmask[j % 32].
        for m in range(32):
            y[yo + m] = 0
        for j in range(QK):
            if L[j] > 3:
                y[yo + j % 32] |= 1 << (j // 32)
                L[j] -= 4
        pack_2bit(L, y, yo + 32)


# --- Q4_K / Q5_K: d | dmin | scales[12] (6-bit scales and mins) | [qh[32]] | qs[128] --------------

@njit(**OPTS)
def k4_scale_min(y, so, j):
    """get_scale_min_k4: the 6-bit scale and min of sub-block j from the 12 bytes at y[so:]."""
    a = np.int64(y[so + j])
    b = np.int64(y[so + j + 4])
    if j < 4:
        return a & 63, b & 63
    c = np.int64(y[so + j - 4])
    return (b & 0xF) | ((c >> 6) << 4), (b >> 4) | ((a >> 6) << 4)


@njit(**OPTS)
def k4_block(x, xo, qw, has_qw, y, yo, nmax, L, Laux, w, scales, mins, sw, Ls, Lm):
    """The common part of Q4_K (nmax 15) and Q5_K (nmax 31): sub-block scales and mins, their 6-bit
    codes and the super-block d/dmin written to y[yo:yo+16], the weights' codes left in L."""
    so = yo + 4
    if has_qw:
        sigma2 = np.float32(np.float32(np.float32(2.0) * sum_squares(x, xo, QK)) / np.float32(QK))
        for j in range(8):
            imatrix_weights(x, xo + 32 * j, qw, 32, sigma2, w)
            s = np.float32(0.0)
            for l in range(32):
                s += w[l]
            sw[j] = s
            scales[j], mins[j] = make_qkx_quants(
                32, nmax, x, xo + 32 * j, w, 0, L, 32 * j, Laux,
                np.float32(-0.9), np.float32(0.05), 36, False)
        d_block = make_qp_quants(8, 63, scales, Ls, sw)
        m_block = make_qp_quants(8, 63, mins, Lm, sw)
        if nmax == 31:  # quantize_row_q5_K_impl clamps the codes, the Q4_K one does not
            for j in range(8):
                Ls[j] = min(63, Ls[j])
                Lm[j] = min(63, Lm[j])
    else:
        rmin, rdelta, nstep = ((np.float32(-1.0), np.float32(0.1), 20) if nmax == 15
                               else (np.float32(-0.5), np.float32(0.1), 15))
        max_scale = np.float32(0.0)
        max_min = np.float32(0.0)
        for j in range(8):
            av_x = np.sqrt(np.float32(sum_squares(x, xo + 32 * j, 32) / np.float32(32.0)))
            for l in range(32):
                w[l] = np.float32(av_x + abs(x[xo + 32 * j + l]))
            scales[j], mins[j] = make_qkx_quants(
                32, nmax, x, xo + 32 * j, w, 0, L, 32 * j, Laux, rmin, rdelta, nstep, False)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = np.float32(np.float32(63.0) / max_scale) if max_scale > 0 else np.float32(0.0)
        inv_min = np.float32(np.float32(63.0) / max_min) if max_min > 0 else np.float32(0.0)
        for j in range(8):
            Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
            Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        d_block = np.float32(max_scale / np.float32(63.0))
        m_block = np.float32(max_min / np.float32(63.0))
    for j in range(8):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if j < 4:
            y[so + j] = ls
            y[so + j + 4] = lm
        else:
            y[so + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            y[so + j - 4] |= ((ls >> 4) << 6) & 0xFF
            y[so + j] |= ((lm >> 4) << 6) & 0xFF
    d = put_f16(y, yo, d_block)
    dmin = put_f16(y, yo + 2, m_block)
    for j in range(8):
        sc, m = k4_scale_min(y, so, j)
        dl = np.float32(d * np.float32(sc))
        if dl == 0:
            continue
        ml = np.float32(dmin * np.float32(m))
        for ii in range(32):
            l = nearest_int(np.float32(x[xo + 32 * j + ii] + ml) / dl)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(**OPTS)
def q45_k_row(x, qw, has_qw, y, nmax):
    L = np.zeros(QK, np.uint8)
    Laux = np.empty(32, np.uint8)
    w = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sw = np.empty(8, np.float32)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    size = 144 if nmax == 15 else 176
    for i in range(len(x) // QK):
        xo = QK * i
        yo = size * i
        k4_block(x, xo, qw, has_qw, y, yo, nmax, L, Laux, w, scales, mins, sw, Ls, Lm)
        if nmax == 15:
            for c in range(4):
                for l in range(32):
                    y[yo + 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + l + 32] << 4)
        else:
            qh = yo + 16
            for l in range(32):
                y[qh + l] = 0
            for c in range(4):
                for l in range(32):
                    l1 = np.int64(L[64 * c + l])
                    l2 = np.int64(L[64 * c + l + 32])
                    if l1 > 15:
                        l1 -= 16
                        y[qh + l] |= 1 << (2 * c)
                    if l2 > 15:
                        l2 -= 16
                        y[qh + l] |= 2 << (2 * c)
                    y[yo + 48 + 32 * c + l] = l1 | (l2 << 4)


# --- Q6_K: ql[128] | qh[64] | scales[16] int8 | d ---------------------------------------------------

@njit(**OPTS)
def q6_k_row(x, qw, has_qw, y):
    L = np.zeros(QK, np.int8)
    scales = np.empty(16, np.float32)
    for i in range(len(x) // QK):
        xo = QK * i
        yo = 210 * i
        max_scale = np.float32(0.0)
        max_abs_scale = np.float32(0.0)
        for ib in range(16):
            scale = make_qx_quants(16, 32, x, xo + 16 * ib, L, 16 * ib, qw, xo + 16 * ib, has_qw)
            scales[ib] = scale
            a = abs(scale)
            if a > max_abs_scale:
                max_abs_scale = a
                max_scale = scale
        if max_abs_scale < GROUP_MAX_EPS:
            for k in range(210):
                y[yo + k] = 0
            continue
        iscale = np.float32(np.float32(-128.0) / max_scale)
        d = put_f16(y, yo + 208, np.float32(np.float32(1.0) / iscale))
        for ib in range(16):
            y[yo + 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
        for j in range(16):
            dl = np.float32(d * np.float32(wrap_i8(np.int64(y[yo + 192 + j]))))
            if dl == 0:
                continue
            for ii in range(16):
                l = nearest_int(x[xo + 16 * j + ii] / dl)
                L[16 * j + ii] = max(-32, min(31, l)) + 32
        for h in range(2):
            j = 128 * h
            ql = yo + 64 * h
            qh = yo + 128 + 32 * h
            for l in range(32):
                q1 = L[j + l] & 0xF
                q2 = L[j + l + 32] & 0xF
                q3 = L[j + l + 64] & 0xF
                q4 = L[j + l + 96] & 0xF
                y[ql + l] = q1 | (q3 << 4)
                y[ql + l + 32] = q2 | (q4 << 4)
                y[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                             | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)) & 0xFF
