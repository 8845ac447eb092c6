"""Triton kernels that each do in one launch what plain torch does in five to thirty: norms, rotary
embedding, storing keys and values, the attention of decode tokens over the paged cache, gated
activations. A decode step is launch-bound (graphs.py), so the kernel count per layer is its cost.
Float32 inside; each kernel reads and writes the activation dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


MAX_SPLITS = 32  # decode attention: position splits per (sequence, KV head) at most


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def _norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, eps, RMS: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = x / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    else:
        xc = tl.where(mask, x - tl.sum(x, axis=0) / D, 0.0)
        y = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor:
    x = x.contiguous()
    D = x.shape[-1]
    y = torch.empty_like(x)
    _norm_kernel[(x.numel() // D,)](x, x if w is None else w, x if b is None else b, y, D, eps, RMS=rms,
                                    HAS_W=w is not None, HAS_B=b is not None, BD=_pow2(D), num_warps=4)
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, D, HALF, stride_t, stride_h, NEOX: tl.constexpr,
                 BH: tl.constexpr, BD: tl.constexpr):
    # program t: every head of one token (a program per head made H times the programs, each of one
    # row: what Triton's interpreter, the CPU tests' way to run the kernels, pays per program). Feature
    # i of the first 2*HALF rotates with its partner (i +- HALF: NEOX; i +- 1: adjacent pairs) by the
    # angle of pair j; the rest pass through.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)[:, None]
    i = tl.arange(0, BD)[None, :]
    inside = (h < H) & (i < D)
    rot = (h < H) & (i < 2 * HALF)
    if NEOX:
        first = i < HALF
        j = tl.where(first, i, i - HALF)
        partner = tl.where(first, i + HALF, i - HALF)
    else:
        first = i % 2 == 0
        j = i // 2
        partner = tl.where(first, i + 1, i - 1)
    src = t * stride_t + h * stride_h
    x = tl.load(x_ptr + src + i, mask=inside, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + src + partner, mask=rot, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * HALF + j, mask=i < 2 * HALF, other=0.0)
    s = tl.load(sin_ptr + t * HALF + j, mask=i < 2 * HALF, other=0.0)
    # first of a pair: a*c - b*s; second: a*s + b*c (a the first, b the second)
    y = tl.where(first, x * c - xp * s, xp * s + x * c)
    tl.store(y_ptr + (t * H + h) * D + i, tl.where(rot, y, x).to(y_ptr.dtype.element_ty), mask=inside)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_dims: int, neox: bool) -> torch.Tensor:
    """x (T, H, D), read through its strides (a column slice of a product: no copy); cos, sin
    (T, n_dims / 2) float32. Returns a contiguous (T, H, D)."""
    if x.stride(2) != 1:
        x = x.contiguous()
    T, H, D = x.shape
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    BH, BD = _pow2(H), _pow2(D)
    _rope_kernel[(T,)](x, cos.contiguous(), sin.contiguous(), y, H, D, n_dims // 2, x.stride(0), x.stride(1),
                       NEOX=neox, BH=BH, BD=BD, num_warps=1 if BH * BD <= 1024 else 4)
    return y


@triton.jit
def _store_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, write_ptr, KD, VD, stride_k, stride_v, BK: tl.constexpr,
                  BV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(write_ptr + t)
    i = tl.arange(0, BK)
    tl.store(keys_ptr + row * KD + i, tl.load(k_ptr + t * stride_k + i, mask=i < KD).to(keys_ptr.dtype.element_ty),
             mask=i < KD)
    j = tl.arange(0, BV)
    tl.store(values_ptr + row * VD + j,
             tl.load(v_ptr + t * stride_v + j, mask=j < VD).to(values_ptr.dtype.element_ty), mask=j < VD)


def store(keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """keys[write[t]] = k[t], values[write[t]] = v[t] for each token t (rows of kv_heads * dim; a token's
    row must be contiguous, the tokens may be apart: column slices of a product are read in place)."""
    k, v = _rows(k), _rows(v)
    KD, VD = k[0].numel(), v[0].numel()
    _store_kernel[(k.shape[0],)](k, v, keys, values, write, KD, VD, k.stride(0), v.stride(0), BK=_pow2(KD),
                                 BV=_pow2(VD), num_warps=1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with each row (the first axis) contiguous in memory, copied only where it is not."""
    return x if x[:1].is_contiguous() or x.shape[0] == 0 else x.contiguous()


@triton.jit
def _decode_attention_kernel(q_ptr, keys_ptr, values_ptr, tables_ptr, lens_ptr, slopes_ptr, m_ptr, l_ptr, acc_ptr,
                             n_head, n_kv, D, DV, n_blocks, scale, softcap, window, S,
                             GROUP: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                             BLOCK: tl.constexpr, BN: tl.constexpr, ITERS: tl.constexpr,
                             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    # program (b, kv head, split): the GROUP query heads sharing this KV head, over the ITERS * BN
    # positions of this split (flash-decoding: the splits run in parallel, _combine_kernel joins
    # them), with a running softmax; positions at or past the sequence's length are masked
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, BG)
    gm = g < GROUP
    heads = kh * GROUP + g
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(q_ptr + (b * n_head + heads[:, None]) * D + d[None, :], mask=gm[:, None] & (d[None, :] < D),
                other=0.0).to(tl.float32)
    n = tl.load(lens_ptr + b)
    q_pos = n - 1
    if ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gm, other=0.0)
    m_i = tl.full((BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, BDV), tl.float32)
    for it in range(ITERS):
        pos = (sp * ITERS + it) * BN + tl.arange(0, BN)
        valid = pos < n
        if WINDOW:
            valid = valid & (pos > q_pos - window)
        blk = tl.load(tables_ptr + b * n_blocks + pos // BLOCK, mask=valid, other=0)
        rows = blk.to(tl.int64) * BLOCK + pos % BLOCK
        k = tl.load(keys_ptr + (rows[:, None] * n_kv + kh) * D + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        v = tl.load(values_ptr + (rows[:, None] * n_kv + kh) * DV + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)  # (in flight with k)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (BG, BN)
        if SOFTCAP:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
        if ALIBI:
            s = s + slope[:, None] * pos[None, :].to(tl.float32)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    part = (b * n_head + heads) * S + sp  # this split's running max, sum and weighted values per head
    tl.store(m_ptr + part, m_i, mask=gm)
    tl.store(l_ptr + part, l_i, mask=gm)
    tl.store(acc_ptr + part[:, None] * BDV + dv[None, :], acc, mask=gm[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, DV, S, BS: tl.constexpr, BDV: tl.constexpr):
    # program (b * n_head + h): the splits' partial softmaxes joined, rescaled to their common max
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BS)
    sm = s < S
    dv = tl.arange(0, BDV)
    m = tl.load(m_ptr + bh * S + s, mask=sm, other=float("-inf"))
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    total = tl.sum(w * tl.load(l_ptr + bh * S + s, mask=sm, other=0.0), axis=0)
    acc = tl.load(acc_ptr + (bh * S + s)[:, None] * BDV + dv[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / total
    tl.store(out_ptr + bh * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, softcap: float | None, window: int | None,
                     slopes: torch.Tensor | None, out: torch.Tensor, block: int) -> None:
    """out (B, H * DV) = attention of q (B, H, D) over each sequence's cached positions 0..lens-1."""
    B, H, D = q.shape
    n_kv, DV = keys.shape[1], values.shape[2]
    group = H // n_kv
    L = tables.shape[1] * block
    BG, BD, BDV = max(2, _pow2(group)), _pow2(D), _pow2(DV)
    BN = max(16, min(64, 8192 // (BG * BD)))  # the (BG, BN, BD) products held at once
    # positions split over programs so that a short batch still fills the GPU (one program walking
    # every position is a chain of dependent loads); at most MAX_SPLITS partials per head to join
    iters = max(1, -(-L // (BN * MAX_SPLITS)))
    S = -(-L // (BN * iters))
    m = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty((B, H, S, BDV), dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(B, n_kv, S)](
        q.contiguous(), keys, values, tables, lens, q if slopes is None else slopes, m, l_, acc,
        H, n_kv, D, DV, tables.shape[1], scale, float(softcap or 1.0), int(window or 0), S,
        GROUP=group, BG=BG, BD=BD, BDV=BDV, BLOCK=block, BN=BN, ITERS=iters,
        SOFTCAP=bool(softcap), ALIBI=slopes is not None, WINDOW=bool(window), num_warps=4)
    _combine_kernel[(B * H,)](m, l_, acc, out, DV, S, BS=_pow2(S), BDV=BDV, num_warps=1)


@triton.jit
def act(g, SILU: tl.constexpr):
    """SiLU, or GELU in its tanh form (tanh(z) = 2 sigmoid(2z) - 1), in float32: the gate's activation
    (here and in the fused gate|up product of triton_kernels.py)."""
    if SILU:
        a = g / (1.0 + tl.exp(-g))
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z)))
    return a


@triton.jit
def _glu_kernel(g_ptr, u_ptr, y_ptr, N, stride_g, stride_u, SILU: tl.constexpr, B: tl.constexpr):
    # program (t, j): columns j*B.. of row t
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * B + tl.arange(0, B)
    mask = i < N
    g = tl.load(g_ptr + t * stride_g + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + t * stride_u + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * N + i, (act(g, SILU) * u).to(y_ptr.dtype.element_ty), mask=mask)


def glu(gate: torch.Tensor, up: torch.Tensor, silu: bool) -> torch.Tensor:
    """act(gate) * up for (rows, N) tensors whose rows are contiguous (the halves of a gate|up product
    are read in place); any other shape is flattened."""
    shape = gate.shape
    if gate.ndim != 2 or gate.stride(1) != 1 or up.stride(1) != 1:
        gate, up = gate.contiguous().reshape(1, -1), up.contiguous().reshape(1, -1)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    T, n = gate.shape
    _glu_kernel[(T, triton.cdiv(n, 1024))](gate, up, y, n, gate.stride(0), up.stride(0), SILU=silu, B=1024,
                                          num_warps=4)
    return y.reshape(shape)
