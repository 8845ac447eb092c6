"""Triton kernels that multiply packed planes (packed.py) by a few activation rows: the decode step.

One kernel serves every block type: the layout's fields are compile-time constants, so each type gets
its own specialised code. A program computes BN outputs of one activation row (one row: the weights
are read once per token, the memory-bound case) or of BM rows at once (several sequences, or a short
prompt chunk: the weights are unpacked once for all of them and multiplied with tl.dot in float32).
Weights are unpacked with ggml's float steps in float32, and products accumulate in float32.

Runs under Triton's interpreter (TRITON_INTERPRET=1) on the CPU too, which is how the tests check it
without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import Packed, levels

BN, BK = 16, 256  # outputs and weights per program step (BK: a multiple of every group size)
BN_ONE, BK_ONE = 4, 1024  # one activation row: few outputs and long steps per program, so that many
# programs each have many bytes in flight (the loop is memory-bound)
BM = 16  # activation rows per program when there are several (tl.dot's smallest tile)


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
def _matvec_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, mn_ptr, m_ptr, dmin_ptr, table_ptr,
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


def matvec(x: torch.Tensor, w: Packed, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) of out_dtype for a packed w, float32 accumulation. The caller checks
    shapes."""
    M, K = x.shape
    N = w.shape[0]
    x = x.contiguous()
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rows, bn, bk = (1, BN_ONE, BK_ONE) if M == 1 else (BM, BN, BK)
    ptrs, consts = _args(w)
    _matvec_kernel[(triton.cdiv(M, rows), triton.cdiv(N, bn))](
        x, y, *ptrs, levels(x.device), M, N, x.stride(0), y.stride(0), ROWS=rows, BN=bn, BK=bk,
        num_warps=4, **consts)
    return y
