"""Triton kernels that multiply packed planes (packed.py) by activation rows: decode steps and prompts.

One kernel family serves every block type: the layout's fields are compile-time constants, so each
type gets its own specialised code. Five ways to cut the work (default_config): "wide" reads each
program's rows of bytes whole (16-byte loads), turns codes into floats without a conversion
instruction (_exact), sums each group of columns against x before scaling it, and takes every
activation row (up to 16) from the same unpacked weights, so the weights are read once per step;
"dot" unpacks the bytes as "wide" does into weights of the activation dtype and multiplies a tile of
activation rows with tl.dot (tensor cores), so a prompt never writes a dequantized copy of a matrix;
"pairs" reads a byte and a scale per pair of columns, for one activation row or BM rows at once
(multiplied with tl.dot in float32); "rows" is one program per activation row (each reads the
weights, mostly from the L2 cache); "groups" is "wide" with scattered loads. "wide", "groups" and
"dot" can fuse a gate|up pair with its activation. Products accumulate in float32.

How many outputs and columns a program takes, and with how many warps, decides the speed: a GPU's
measured best per shape lives in configs/<GPU name>.json, written by benchmarks/gpu_kernels.py
--table (PURELM_TRITON_CONFIGS names another file); other GPUs get the rule in default_config.

Runs under Triton's interpreter (TRITON_INTERPRET=1) on the CPU too, which is how the tests check it
without a GPU.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

from .fused import act
from .packed import Packed, levels

KERNELS = ("pairs", "rows", "groups", "wide", "dot")  # see default_config
FUSES = ("groups", "wide", "dot")  # kernels that can apply a gate|up pair's activation themselves
BN, BK = 16, 256  # outputs and columns per program step (BK: a power of two, a multiple of every group)
BM = 16  # activation rows per program when there are several (tl.dot's smallest tile)
BN_WIDE, BK_WIDE = 4, 2048  # "wide" where no table says: the H200's best for one row on most shapes
DOT_RULE = ("dot", 128, 64, 8, 128)  # "dot" for a prompt where no table says
MANY = 512  # the row bucket of more than BM rows (a prompt)


@triton.jit
def _code(lo_ptr, hi_ptr, r, k, mask, K: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr):
    """The codes of elements k (any bits per code; 4-bit pairs are read by _pair_tile directly)."""
    if LO_BITS == 8:
        code = tl.load(lo_ptr + r * K + k, mask=mask, other=0).to(tl.int32)
    else:
        PER: tl.constexpr = 8 // LO_BITS
        byte = tl.load(lo_ptr + r * (K // PER) + k // PER, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k % PER) * LO_BITS)) & ((1 << LO_BITS) - 1)
    return code


@triton.jit
def _high(code, hi_ptr, r, k, mask, K: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr):
    if HI_BITS > 0:
        PER_H: tl.constexpr = 8 // HI_BITS
        hb = tl.load(hi_ptr + r * (K // PER_H) + k // PER_H, mask=mask, other=0).to(tl.int32)
        code = code | (((hb >> ((k % PER_H) * HI_BITS)) & ((1 << HI_BITS) - 1)) << LO_BITS)
    return code


@triton.jit
def _value(code, table_ptr, mask, OFFSET: tl.constexpr, TABLE: tl.constexpr):
    if TABLE:
        v = tl.load(table_ptr + code, mask=mask, other=0.0)
    else:
        v = (code - OFFSET).to(tl.float32)
    return v


@triton.jit
def _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r, k, mask, K: tl.constexpr, SUPER: tl.constexpr,
           G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr, HAS_M: tl.constexpr):
    """The scale s and offset c of the weights at columns k: w = v * s (+ c): c = m (Q4_1, Q5_1) or
    -dmin * mn (K-quants' mins), in ggml's order of float steps."""
    s = tl.load(d_ptr + r * (K // SUPER) + k // SUPER, mask=mask, other=0.0).to(tl.float32)
    if HAS_SC:
        s = s * tl.load(sc_ptr + r * (K // G) + k // G, mask=mask, other=0).to(tl.float32)
    c = s
    if HAS_M:
        c = tl.load(m_ptr + r * (K // 32) + k // 32, mask=mask, other=0.0).to(tl.float32)
    if HAS_MN:
        dmin = tl.load(dmin_ptr + r * (K // SUPER) + k // SUPER, mask=mask, other=0.0).to(tl.float32)
        c = -(dmin * tl.load(mn_ptr + r * (K // G) + k // G, mask=mask, other=0).to(tl.float32))
    return s, c


@triton.jit
def _tile(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, k, mask, K: tl.constexpr,
          LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
          SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
          HAS_M: tl.constexpr):
    """Weights of rows r (BN, 1) at columns k (1, BK) as float32 (BN, BK); 0 where ~mask."""
    code = _high(_code(lo_ptr, hi_ptr, r, k, mask, K, LO_BITS, HI_BITS), hi_ptr, r, k, mask, K, LO_BITS, HI_BITS)
    s, c = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r, k, mask, K, SUPER, G, HAS_SC, HAS_MN, HAS_M)
    w = _value(code, table_ptr, mask, OFFSET, TABLE) * s
    if HAS_M or HAS_MN:
        w = w + c
    return w


@triton.jit
def _group_codes(lo_ptr, hi_ptr, r, kg, j, mask, K: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr):
    """The codes of the even and odd columns kg + 2j, kg + 2j + 1 of rows r (a (rows, groups, pairs)
    tile, kg each group's first column): a pair shares its byte, so each byte is read once, and the
    bytes of a group are contiguous (wide loads)."""
    if LO_BITS == 4:
        byte = tl.load(lo_ptr + r * (K // 2) + kg // 2 + j, mask=mask, other=0).to(tl.int32)
        ce, co = byte & 15, byte >> 4
    else:  # 2 bits: four codes a byte, two pairs
        byte = tl.load(lo_ptr + r * (K // 4) + kg // 4 + j // 2, mask=mask, other=0).to(tl.int32)
        sh = (j % 2) * 4
        ce, co = (byte >> sh) & 3, (byte >> (sh + 2)) & 3
    if HI_BITS > 0:
        PER_H: tl.constexpr = 8 // HI_BITS
        PAIRS_H: tl.constexpr = PER_H // 2
        hb = tl.load(hi_ptr + r * (K // PER_H) + kg // PER_H + j // PAIRS_H, mask=mask, other=0).to(tl.int32)
        sh = (j % PAIRS_H) * (2 * HI_BITS)
        HMASK: tl.constexpr = (1 << HI_BITS) - 1
        ce = ce | (((hb >> sh) & HMASK) << LO_BITS)
        co = co | (((hb >> (sh + HI_BITS)) & HMASK) << LO_BITS)
    return ce, co


@triton.jit
def _step_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, rmask, kg,
                  K: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr,
                  TABLE: tl.constexpr, SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr,
                  HAS_MN: tl.constexpr, HAS_M: tl.constexpr):
    """Rows r (BN, 1, 1) at the groups of G columns starting at kg (1, NG, 1): the codes' values of
    the even and odd columns (BN, NG, G/2) (8-bit codes: all columns (BN, NG, G), twice), and each
    group's scale s and offset c (BN, NG): w = v * s + c."""
    NG: tl.constexpr = kg.shape[1]
    mask = rmask & (kg < K)
    if LO_BITS == 8:
        j = tl.arange(0, G)[None, None, :]
        ve = tl.load(lo_ptr + r * K + kg + j, mask=mask, other=0).to(tl.float32)
        vo = ve
    else:
        j = tl.arange(0, G // 2)[None, None, :]
        ce, co = _group_codes(lo_ptr, hi_ptr, r, kg, j, mask, K, LO_BITS, HI_BITS)
        ve = _value(ce, table_ptr, mask, OFFSET, TABLE)
        vo = _value(co, table_ptr, mask, OFFSET, TABLE)
    r2 = tl.reshape(r, (r.shape[0], 1))
    kg2 = tl.reshape(kg, (1, NG))
    mask2 = tl.reshape(rmask, (r.shape[0], 1)) & (kg2 < K)
    s, c = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r2, kg2, mask2, K, SUPER, G, HAS_SC, HAS_MN, HAS_M)
    return ve, vo, s, c


@triton.jit
def _step_dot(ve, vo, s, c, x_ptr, xrow, xmask, kg, K: tl.constexpr, LO_BITS: tl.constexpr, G: tl.constexpr,
              HAS_MIN: tl.constexpr):
    """sum over a step's columns of w[r, k] * x[k], per row and group: (BN, NG) float32. A group's
    values are summed against x first and scaled once (sum(w x) = s sum(v x) + c sum(x)), so scales
    are applied once per group, not per weight."""
    gmask = xmask & (kg < K)
    if LO_BITS == 8:
        j = tl.arange(0, G)[None, None, :]
        xv = tl.load(x_ptr + xrow + kg + j, mask=gmask, other=0.0).to(tl.float32)
        part = tl.sum(ve * xv, axis=2)
        if HAS_MIN:
            xs = tl.sum(xv, axis=2)
    else:
        j = tl.arange(0, G // 2)[None, None, :]
        xe = tl.load(x_ptr + xrow + kg + 2 * j, mask=gmask, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + xrow + kg + 2 * j + 1, mask=gmask, other=0.0).to(tl.float32)
        part = tl.sum(ve * xe + vo * xo, axis=2)
        if HAS_MIN:
            xs = tl.sum(xe + xo, axis=2)
    part = part * s
    if HAS_MIN:
        part = part + c * xs
    return part


@triton.jit
def _pair_tile(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, ke, mask, K: tl.constexpr,
               LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
               SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
               HAS_M: tl.constexpr):
    """Weights at the even columns ke and the odd ones ke + 1 of rows r, as two float32 tiles. A pair
    shares its byte (4-bit codes) and its scales (groups are even), so each is read once."""
    ko = ke + 1
    if LO_BITS == 4:
        byte = tl.load(lo_ptr + r * (K // 2) + ke // 2, mask=mask, other=0).to(tl.int32)
        ce, co = byte & 15, byte >> 4
    else:
        ce = _code(lo_ptr, hi_ptr, r, ke, mask, K, LO_BITS, HI_BITS)
        co = _code(lo_ptr, hi_ptr, r, ko, mask, K, LO_BITS, HI_BITS)
    ce = _high(ce, hi_ptr, r, ke, mask, K, LO_BITS, HI_BITS)
    co = _high(co, hi_ptr, r, ko, mask, K, LO_BITS, HI_BITS)
    ve = _value(ce, table_ptr, mask, OFFSET, TABLE)
    vo = _value(co, table_ptr, mask, OFFSET, TABLE)
    s, c = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r, ke, mask, K, SUPER, G, HAS_SC, HAS_MN, HAS_M)
    we, wo = ve * s, vo * s
    if HAS_M or HAS_MN:
        we, wo = we + c, wo + c
    return we, wo


@triton.jit
def _pairs_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr,
                   M, N, stride_x, stride_y, K: tl.constexpr,
                   LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
                   SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
                   HAS_M: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # program (i, j): outputs j*BN.. of activation rows i*ROWS..; i varies fastest, so the programs
    # that read the same weights run together and share them through the L2 cache. Columns go in
    # pairs (even, odd): BK/2 pairs per step.
    m0 = tl.program_id(0) * ROWS
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    r = rows[:, None].to(tl.int64)
    if ROWS == 1:
        acc = tl.zeros((BN, BK // 2), tl.float32)
    else:
        ms = m0 + tl.arange(0, ROWS)
        acc2 = tl.zeros((ROWS, BN), tl.float32)
    for k0 in range(0, K, BK):
        ke = k0 + 2 * tl.arange(0, BK // 2)
        kmask = ke < K
        mask = rmask[:, None] & kmask[None, :]
        we, wo = _pair_tile(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, ke[None, :], mask,
                            K, LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN, HAS_M)
        if ROWS == 1:
            xe = tl.load(x_ptr + m0 * stride_x + ke, mask=kmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + m0 * stride_x + ke + 1, mask=kmask, other=0.0).to(tl.float32)
            acc += we * xe[None, :] + wo * xo[None, :]
        else:
            xm = (ms[:, None] < M) & kmask[None, :]
            xrow = x_ptr + ms[:, None].to(tl.int64) * stride_x + ke[None, :]
            xe = tl.load(xrow, mask=xm, other=0.0).to(tl.float32)
            xo = tl.load(xrow + 1, mask=xm, other=0.0).to(tl.float32)
            acc2 += tl.dot(xe, tl.trans(we), input_precision="ieee")
            acc2 += tl.dot(xo, tl.trans(wo), input_precision="ieee")
    if ROWS == 1:
        tl.store(y_ptr + m0 * stride_y + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        ym = (ms[:, None] < M) & rmask[None, :]
        tl.store(y_ptr + ms[:, None].to(tl.int64) * stride_y + rows[None, :], acc2.to(y_ptr.dtype.element_ty), mask=ym)




@triton.jit
def _exact(code, OFFSET: tl.constexpr):
    """code - OFFSET as float32 for integer codes in [0, 2**23): the code's bits under the exponent of
    2**23, less 2**23 + OFFSET (exact; one OR and one subtraction where a conversion is slower)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _byte_value(code, table_ptr, OFFSET: tl.constexpr, TABLE: tl.constexpr):
    if TABLE:
        v = tl.load(table_ptr + code)
    else:
        v = _exact(code, OFFSET)
    return v


@triton.jit
def _wide_values(lo_ptr, hi_ptr, table_ptr, r, rmask, k0, K: tl.constexpr, LO_BITS: tl.constexpr,
                 HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr, BK: tl.constexpr):
    """The values (code - offset, or the table's level) of rows r (BN, 1) at columns k0..k0+BK, read as
    whole bytes of the lo plane (wide contiguous loads): (BN, BK / PER) per code of a byte, PER =
    8 / LO_BITS of them (four, unused ones repeat the first), code i of byte u being column u*PER + i."""
    PER: tl.constexpr = 8 // LO_BITS
    BU: tl.constexpr = BK // PER
    u = k0 // PER + tl.arange(0, BU)[None, :]
    mask = rmask & (u < K // PER)
    b = tl.load(lo_ptr + r * (K // PER) + u, mask=mask, other=0).to(tl.int32)
    if LO_BITS == 8:
        c0 = b + 128  # int8 codes, shifted to be non-negative (undone by the offset below)
        c1, c2, c3 = c0, c0, c0
    elif LO_BITS == 4:
        c0, c1 = b & 15, b >> 4
        c2, c3 = c0, c1
    else:
        c0, c1, c2, c3 = b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6
    if HI_BITS > 0:  # a hi byte holds the high bits of UPH lo bytes: read once, spread to each
        PER_H: tl.constexpr = 8 // HI_BITS
        UPH: tl.constexpr = PER_H // PER
        BN: tl.constexpr = r.shape[0]
        uh = k0 // PER_H + tl.arange(0, BU // UPH)[None, :]
        hb = tl.load(hi_ptr + r * (K // PER_H) + uh, mask=rmask & (uh < K // PER_H), other=0).to(tl.int32)
        hb = tl.reshape(tl.broadcast_to(hb[:, :, None], (BN, BU // UPH, UPH)), (BN, BU))
        sh = (tl.arange(0, BU) % UPH)[None, :] * (PER * HI_BITS)
        HM: tl.constexpr = (1 << HI_BITS) - 1
        c0 = c0 | (((hb >> sh) & HM) << LO_BITS)
        c1 = c1 | (((hb >> (sh + HI_BITS)) & HM) << LO_BITS)
        if PER == 4:
            c2 = c2 | (((hb >> (sh + 2 * HI_BITS)) & HM) << LO_BITS)
            c3 = c3 | (((hb >> (sh + 3 * HI_BITS)) & HM) << LO_BITS)
    OFF: tl.constexpr = 128 if LO_BITS == 8 else OFFSET
    v0 = _byte_value(c0, table_ptr, OFF, TABLE)
    v1, v2, v3 = v0, v0, v0
    if PER >= 2:
        v1 = _byte_value(c1, table_ptr, OFF, TABLE)
    if PER == 4:
        v2 = _byte_value(c2, table_ptr, OFF, TABLE)
        v3 = _byte_value(c3, table_ptr, OFF, TABLE)
    return v0, v1, v2, v3


@triton.jit
def _wide_row(v0, v1, v2, v3, s, c, x_ptr, xrow, xok, k0, K: tl.constexpr, LO_BITS: tl.constexpr,
              G: tl.constexpr, HAS_MIN: tl.constexpr, BK: tl.constexpr):
    """One activation row's sums over the step's columns, per weight row: (BN,). x is read whole and
    split like the bytes' codes; a group's products are summed, then scaled once."""
    PER: tl.constexpr = 8 // LO_BITS
    BU: tl.constexpr = BK // PER
    NG: tl.constexpr = BK // G
    BN: tl.constexpr = v0.shape[0]
    k = k0 + tl.arange(0, BK)
    xv = tl.load(x_ptr + xrow + k, mask=xok & (k < K), other=0.0).to(tl.float32)
    if PER == 1:
        p = v0 * xv[None, :]
    elif PER == 2:
        x0, x1 = tl.split(tl.reshape(xv, (BU, 2)))
        p = v0 * x0[None, :] + v1 * x1[None, :]
    else:
        a, b = tl.split(tl.reshape(xv, (BU, 2, 2)))  # a: columns 4u, 4u+2; b: 4u+1, 4u+3
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        p = v0 * x0[None, :] + v1 * x1[None, :] + v2 * x2[None, :] + v3 * x3[None, :]
    part = tl.sum(tl.reshape(p, (BN, NG, G // PER)), axis=2) * s
    if HAS_MIN:
        part += c * tl.sum(tl.reshape(xv, (NG, G)), axis=1)[None, :]
    return tl.sum(part, axis=1)


@triton.jit
def _wide_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr,
                 M, N, stride_x, stride_y, K: tl.constexpr,
                 LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
                 SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
                 HAS_M: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GLU: tl.constexpr, SILU: tl.constexpr):
    # program (j, i): outputs j*BN.. of activation rows i*ROWS.. (every row, where there are at most
    # ROWS: the weights read once).
    # A step reads BN rows' bytes for BK columns whole (16-byte loads), turns codes into floats once,
    # and takes each activation row's sums from them. With GLU, output n is act(row n) * row (n + N)
    # of the matrix (a gate|up pair): both halves in one pass, the activation applied on the way out.
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = (rows < N)[:, None]
    r = rows[:, None].to(tl.int64)
    NG: tl.constexpr = BK // G
    HAS_MIN: tl.constexpr = HAS_M or HAS_MN
    m0 = tl.program_id(1) * ROWS
    ms = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BN), tl.float32)
    acc_u = tl.zeros((ROWS, BN), tl.float32)
    for k0 in range(0, K, BK):
        kg = k0 + tl.arange(0, NG)[None, :] * G
        v0, v1, v2, v3 = _wide_values(lo_ptr, hi_ptr, table_ptr, r, rmask, k0, K, LO_BITS, HI_BITS, OFFSET,
                                      TABLE, BK)
        s, c = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r, kg, rmask & (kg < K), K, SUPER, G, HAS_SC,
                      HAS_MN, HAS_M)
        if GLU:
            u0, u1, u2, u3 = _wide_values(lo_ptr, hi_ptr, table_ptr, r + N, rmask, k0, K, LO_BITS, HI_BITS,
                                          OFFSET, TABLE, BK)
            us, uc = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r + N, kg, rmask & (kg < K), K, SUPER, G,
                            HAS_SC, HAS_MN, HAS_M)
        for i in tl.static_range(ROWS):
            xrow = (m0 + i).to(tl.int64) * stride_x
            part = _wide_row(v0, v1, v2, v3, s, c, x_ptr, xrow, m0 + i < M, k0, K, LO_BITS, G, HAS_MIN, BK)
            acc = tl.where(ms[:, None] == i, acc + part[None, :], acc)
            if GLU:
                part = _wide_row(u0, u1, u2, u3, us, uc, x_ptr, xrow, m0 + i < M, k0, K, LO_BITS, G, HAS_MIN, BK)
                acc_u = tl.where(ms[:, None] == i, acc_u + part[None, :], acc_u)
    if GLU:
        acc = act(acc, SILU) * acc_u
    ym = (m0 + ms[:, None] < M) & (rows[None, :] < N)
    tl.store(y_ptr + (m0 + ms[:, None]).to(tl.int64) * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ym)


@triton.jit
def _dot_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, rmask, k0, K: tl.constexpr,
                 LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
                 SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
                 HAS_M: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """Rows r (BN, 1) at columns k0..k0+BK as weights of dtype DT, split like _wide_values' codes:
    w_i (BN, BK / PER) holds column u*PER + i at u (ggml's float steps: v * s + c in float32)."""
    PER: tl.constexpr = 8 // LO_BITS
    BU: tl.constexpr = BK // PER
    NG: tl.constexpr = BK // G
    BN: tl.constexpr = r.shape[0]
    v0, v1, v2, v3 = _wide_values(lo_ptr, hi_ptr, table_ptr, r, rmask, k0, K, LO_BITS, HI_BITS, OFFSET, TABLE, BK)
    kg = k0 + tl.arange(0, NG)[None, :] * G
    s, c = _scale(d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, r, kg, rmask & (kg < K), K, SUPER, G, HAS_SC, HAS_MN, HAS_M)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BN, NG, G // PER)), (BN, BU))  # each byte's group
    c = tl.reshape(tl.broadcast_to(c[:, :, None], (BN, NG, G // PER)), (BN, BU))
    HAS_MIN: tl.constexpr = HAS_M or HAS_MN
    w0, w1, w2, w3 = v0 * s, v1 * s, v2 * s, v3 * s
    if HAS_MIN:
        w0, w1, w2, w3 = w0 + c, w1 + c, w2 + c, w3 + c
    return w0.to(DT), w1.to(DT), w2.to(DT), w3.to(DT)


@triton.jit
def _dot_step(acc, x0, x1, x2, x3, w0, w1, w2, w3, PER: tl.constexpr, IEEE: tl.constexpr):
    """acc + x @ w.T over one step, the columns taken in the codes' split (tensor cores: tl.dot)."""
    if IEEE:
        acc = tl.dot(x0, tl.trans(w0), acc, input_precision="ieee")
        if PER >= 2:
            acc = tl.dot(x1, tl.trans(w1), acc, input_precision="ieee")
        if PER == 4:
            acc = tl.dot(x2, tl.trans(w2), acc, input_precision="ieee")
            acc = tl.dot(x3, tl.trans(w3), acc, input_precision="ieee")
    else:
        acc = tl.dot(x0, tl.trans(w0), acc)
        if PER >= 2:
            acc = tl.dot(x1, tl.trans(w1), acc)
        if PER == 4:
            acc = tl.dot(x2, tl.trans(w2), acc)
            acc = tl.dot(x3, tl.trans(w3), acc)
    return acc


@triton.jit
def _dot_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr,
                M, N, stride_x, stride_y, K: tl.constexpr,
                LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
                SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
                HAS_M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GLU: tl.constexpr, SILU: tl.constexpr):
    # program (i, j): activation rows i*BM.. by outputs j*BN.., i varying fastest, so the programs that
    # read the same weights run together (the weights come from device memory about once). A step
    # unpacks BN rows' bytes for BK columns whole (as "wide" does), scales them into weights of x's
    # dtype, and multiplies them with tl.dot (tensor cores; float32 activations: exact float32
    # products), accumulating in float32. With GLU, output n is act(row n) * row (n + N).
    PER: tl.constexpr = 8 // LO_BITS
    BU: tl.constexpr = BK // PER
    DT: tl.constexpr = x_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = (rows < N)[:, None]
    r = rows[:, None].to(tl.int64)
    xrow = x_ptr + ms[:, None].to(tl.int64) * stride_x
    acc = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)[None, :]
        xv = tl.load(xrow + k, mask=(ms[:, None] < M) & (k < K), other=0.0)
        if PER == 1:
            x0 = xv
            x1, x2, x3 = x0, x0, x0
        elif PER == 2:
            x0, x1 = tl.split(tl.reshape(xv, (BM, BU, 2)))
            x2, x3 = x0, x1
        else:
            a, b = tl.split(tl.reshape(xv, (BM, BU, 2, 2)))  # a: columns 4u, 4u+2; b: 4u+1, 4u+3
            x0, x2 = tl.split(a)
            x1, x3 = tl.split(b)
        w0, w1, w2, w3 = _dot_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, rmask, k0,
                                      K, LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN, HAS_M, BK, DT)
        acc = _dot_step(acc, x0, x1, x2, x3, w0, w1, w2, w3, PER, IEEE)
        if GLU:
            w0, w1, w2, w3 = _dot_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r + N,
                                          rmask, k0, K, LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN,
                                          HAS_M, BK, DT)
            acc_u = _dot_step(acc_u, x0, x1, x2, x3, w0, w1, w2, w3, PER, IEEE)
    if GLU:
        acc = act(acc, SILU) * acc_u
    ym = (ms[:, None] < M) & (rows[None, :] < N)
    tl.store(y_ptr + ms[:, None].to(tl.int64) * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _groups_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr,
                   M, N, stride_x, stride_y, K: tl.constexpr,
                   LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr, TABLE: tl.constexpr,
                   SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr,
                   HAS_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GLU: tl.constexpr, SILU: tl.constexpr):
    # program (i, j): outputs j*BN.. of activation row i, a tile of (BN, groups, columns of a group)
    # per step. With GLU, output n is act(row n) * row (n + N) of the matrix (a gate|up pair): both
    # halves in one pass.
    NG: tl.constexpr = BK // G
    m0 = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    r = rows[:, None, None].to(tl.int64)
    rm3 = rmask[:, None, None]
    acc = tl.zeros((BN, NG), tl.float32)
    if GLU:
        acc_u = tl.zeros((BN, NG), tl.float32)
    HAS_MIN: tl.constexpr = HAS_M or HAS_MN
    xrow = m0 * stride_x
    for i in range(0, tl.cdiv(K, BK)):
        kg = i * BK + tl.arange(0, NG)[None, :, None] * G  # each group's first column (a multiple of
        # G: the compiler sees the loads' alignment)
        ve, vo, s, c = _step_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, rm3, kg,
                                     K, LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN, HAS_M)
        acc += _step_dot(ve, vo, s, c, x_ptr, xrow, m0 < M, kg, K, LO_BITS, G, HAS_MIN)
        if GLU:
            ue, uo, us, uc = _step_weights(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r + N,
                                           rm3, kg, K, LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN,
                                           HAS_M)
            acc_u += _step_dot(ue, uo, us, uc, x_ptr, xrow, m0 < M, kg, K, LO_BITS, G, HAS_MIN)
    out = tl.sum(acc, axis=1)
    if GLU:
        out = act(out, SILU) * tl.sum(acc_u, axis=1)
    tl.store(y_ptr + m0 * stride_y + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _dequant_kernel(y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, N,
                    K: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFFSET: tl.constexpr,
                    TABLE: tl.constexpr, SUPER: tl.constexpr, G: tl.constexpr, HAS_SC: tl.constexpr,
                    HAS_MN: tl.constexpr, HAS_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (ks[None, :] < K)
    r = rows[:, None].to(tl.int64)
    w = _tile(lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr, r, ks[None, :], mask, K,
              LO_BITS, HI_BITS, OFFSET, TABLE, SUPER, G, HAS_SC, HAS_MN, HAS_M)
    tl.store(y_ptr + r * K + ks[None, :], w.to(y_ptr.dtype.element_ty), mask=mask)


def _args(w: Packed) -> tuple[list, dict]:
    """The planes and the layout's constants as the kernels take them (made once per matrix: a prompt
    launches hundreds of products, and each launch's host time adds up)."""
    hit = w.__dict__.get("_kernel_args")
    if hit is None:
        hit = w.__dict__["_kernel_args"] = _make_args(w)
    return hit


def _make_args(w: Packed) -> tuple[list, dict]:
    lay, p = w.layout, w.planes
    d = p["d"]
    ptrs = [p["lo"], p.get("hi", d), d, p.get("sc", d), p.get("mn", d), p.get("m", d), p.get("dmin", d)]
    consts = dict(K=w.shape[1], LO_BITS=lay.lo_bits, HI_BITS=lay.hi_bits, OFFSET=lay.offset, TABLE=lay.table,
                  SUPER=lay.super, G=lay.group, HAS_SC=lay.has_sc, HAS_MN=lay.has_mn, HAS_M=lay.has_m)
    return ptrs, consts


def dequantize(w: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The packed rows as a (N, K) tensor of `dtype` (one kernel, no float32 temporaries)."""
    N, K = w.shape
    y = torch.empty((N, K), dtype=dtype, device=w.planes["lo"].device)
    ptrs, consts = _args(w)
    _dequant_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](y, *ptrs, levels(y.device), N, BN=BN, BK=BK,
                                                              num_warps=4, **consts)
    return y


_tables: dict[str, list[dict]] = {}
_shipped: dict[torch.device, str] = {}  # a GPU's own table (asked for at every eager product: kept)


def tuned(device: torch.device) -> list[dict]:
    """The measured best configurations for this GPU: PURELM_TRITON_CONFIGS (a file that
    benchmarks/gpu_kernels.py --table writes), else configs/<GPU name>.json shipped with purelm."""
    name = os.environ.get("PURELM_TRITON_CONFIGS") or ""
    if not name and device.type == "cuda":
        if device not in _shipped:
            gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")
            _shipped[device] = str(Path(__file__).parent / "configs" / f"{gpu}.json")
        name = _shipped[device]
    if name not in _tables:
        try:
            entries = json.loads(Path(name).read_text())["entries"] if name else []
            _tables[name] = [e for e in entries if _valid(e)]
        except (OSError, ValueError, KeyError, TypeError):
            _tables[name] = []
    return _tables[name]


def _valid(e: object) -> bool:
    c = e.get("config") if isinstance(e, dict) else None
    pow2 = lambda v: type(v) is int and 0 < v <= 8192 and v & (v - 1) == 0  # noqa: E731
    return (isinstance(c, list) and (len(c) == 4 or len(c) == 5 and c[0] == "dot") and c[0] in KERNELS
            and all(pow2(v) for v in c[1:]) and c[1] <= (256 if c[0] == "dot" else 64) and 16 <= c[2] and c[3] <= 16
            and (c[0] != "dot" or c[1] >= 16 and c[2] >= 64 and (len(c) == 4 or 16 <= c[4] <= 256))
            and (c[0] in FUSES or not e.get("glu") or e.get("unfused") is True)
            and all(isinstance(e.get(k), int) and e[k] > 0 for k in ("rows", "n", "k")))


def bucket(M: int) -> int:
    """The row count whose tuned entries serve M activation rows: 1, 2, 4, 8, 16, or MANY (a prompt)."""
    return 1 if M == 1 else triton.next_power_of_2(M) if M <= BM else MANY


def default_config(M: int, N: int, K: int, glu: bool = False, device: torch.device | None = None) -> tuple | None:
    """(kernel, outputs per program, columns per step, warps[, activation rows per program: "dot"]) for
    M activation rows and an (N, K) matrix: the tuned entry of the same row bucket and kind nearest in
    size, else the rule. With `glu`, the product of a gate|up pair with the activation fused, or None
    where two steps (product, then activation) are the choice. Kernels (module docstring): "wide" (the
    rule on a GPU up to 16 rows, and the fused gate|up product of one row), "dot" (the rule for more
    rows, fused gate|up included), "pairs" (the interpreter's rule for 2-16 rows), "rows", "groups"."""
    table = tuned(device or torch.device("cpu"))
    key = (id(table), bucket(M), N, K, glu, device is not None and device.type == "cuda")
    if key not in _chosen:
        _chosen[key] = _choose(table, M, N, K, glu, device)
    return _chosen[key]


_chosen: dict[tuple, tuple | None] = {}  # default_config's answers (asked at every product)


def _choose(table: list[dict], M: int, N: int, K: int, glu: bool, device: torch.device | None) -> tuple | None:
    rows = bucket(M)
    near = [e for e in table if e["rows"] == rows and bool(e.get("glu")) == glu]
    if near:
        best = min(near, key=lambda e: abs(math.log(e["n"] * e["k"] / (N * K))))
        return tuple(best["config"]) if not best.get("unfused") else None
    cuda = device is not None and device.type == "cuda"
    if M > BM:
        return DOT_RULE if cuda else ("dot", 64, 128, 4, 64)
    if glu:
        return None
    if not cuda:  # Triton's interpreter: few, large programs
        return ("wide", 64, 1024, 4) if M == 1 else ("pairs", 64, BK, 4)
    return ("wide", BN_WIDE, BK_WIDE, 4)


def product(x: torch.Tensor, w: Packed, out_dtype: torch.dtype = torch.float32, glu: str | None = None,
            config: tuple | None = None) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) of out_dtype for a packed w, float32 accumulation. `glu` ("silu" or
    "gelu"): w stacks gate and up rows, and the result is act(x @ gate.T) * (x @ up.T), (M, N / 2).
    `config` (see default_config) overrides the choice by shape. The caller checks shapes."""
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    x = x.contiguous()
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return y  # (no programs to launch)
    if glu:
        config = config or default_config(M, N, K, True, x.device) or ("wide", BN_WIDE, BK_WIDE, 4)
        if config[0] not in FUSES or M != 1 and config[0] != "dot":
            raise ValueError("the fused gate|up product takes the dot kernel, or for one activation row "
                             "the groups or wide kernel")
    kernel, bn, bk, warps = (config or default_config(M, N, K, False, x.device))[:4]
    ptrs, consts = _args(w)
    lay = w.layout
    bk = max(bk, lay.group if lay.has_sc else lay.super)  # whole groups (and super-blocks) per step
    if kernel == "dot":  # tensor cores: rows padded to tl.dot's 16
        bm = config[4] if config and len(config) > 4 else (BM if M <= BM else DOT_RULE[4])
        bm = min(bm, max(BM, triton.next_power_of_2(M)))
        _dot_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x, y, *ptrs, levels(x.device), M, N, x.stride(0), y.stride(0), BM=bm, BN=bn,
            BK=max(bk, 16 * (8 // lay.lo_bits)), GLU=glu is not None, SILU=glu == "silu", num_warps=warps, **consts)
    elif kernel == "wide":  # every row (up to BM) in each program: the weights read once
        rows = min(BM, triton.next_power_of_2(M))
        _wide_kernel[(triton.cdiv(N, bn), triton.cdiv(M, rows))](
            x, y, *ptrs, levels(x.device), M, N, x.stride(0), y.stride(0), ROWS=rows,
            BN=bn, BK=bk, GLU=glu is not None, SILU=glu == "silu", num_warps=warps, **consts)
    elif kernel == "groups" and M == 1:
        _groups_kernel[(1, triton.cdiv(N, bn))](
            x, y, *ptrs, levels(x.device), M, N, x.stride(0), y.stride(0), BN=bn, BK=bk,
            GLU=glu is not None, SILU=glu == "silu", num_warps=warps, **consts)
    else:  # "pairs": several rows BM at a time through tl.dot; "rows": a program per row
        rows = 1 if M == 1 or kernel == "rows" else BM
        _pairs_kernel[(triton.cdiv(M, rows), triton.cdiv(N, bn))](
            x, y, *ptrs, levels(x.device), M, N, x.stride(0), y.stride(0), ROWS=rows, BN=bn, BK=bk,
            num_warps=warps, **consts)
    return y
