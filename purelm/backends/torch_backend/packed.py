"""Packed weights on a torch device: every GGUF block type split into planes that a GPU reads well.

A GGUF block interleaves its scales with its quants and orders the quants in ways that suit ggml's
CPU kernels (Q4_0: weights 0-15 in the low nibbles, 16-31 in the high ones). Here each matrix keeps the
same bits, regrouped once at load into planes in natural element order:

    lo    the low bits of every weight's code: 4 per byte (nibbles), 2 per byte, or int8 (Q8_0)
    hi    the high bits, where the type has them: 1 per byte (Q5_*, Q5_K, Q3_K) or 2 (Q6_K)
    d     the block scale (float16), one per 32 weights (legacy types, IQ4_NL) or per 256 (K-quants)
    sc    sub-block scales (uint8 or int8, one per 16 or 32 weights: K-quants, IQ4_XS)
    mn    sub-block mins (uint8, Q2_K, Q4_K, Q5_K) scaled by dmin (float16, one per 256)
    m     block mins (float16, one per 32: Q4_1, Q5_1)

Element k of a row is then, with the float steps in the order ggml and gguf.quants use:

    code = lo[k] | hi[k] << LO_BITS
    v    = TABLE[code] (IQ4_*)  or  code - OFFSET
    w    = v * (d[k // SUPER] * sc[k // G])  (+ m[k // 32])  (- dmin[k // SUPER] * mn[k // G])

The planes take the file's bytes (K-quants with unpacked 6-bit scales: Q4_K/Q5_K 3% more, Q2_K 19%);
nothing is ever held as a float copy of the model. `dequantize` (torch ops, any device) turns rows into
floats for a matrix product; the Triton kernels (triton_kernels.py) read the planes directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...quant.types import BLOCK_INFO, GGMLType

import torch

# kvalues_iq4nl (ggml-common.h): the 16 levels of IQ4_NL and IQ4_XS codes
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Layout:
    """How one block type's planes combine (see the module docstring)."""

    lo_bits: int  # 2, 4 or 8 (8: signed int8)
    hi_bits: int = 0  # 0, 1 or 2
    offset: int = 0
    table: bool = False
    super: int = 32  # weights per d
    group: int = 32  # weights per sc / mn
    has_sc: bool = False
    has_mn: bool = False  # mn and dmin
    has_m: bool = False


LAYOUTS: dict[GGMLType, Layout] = {
    GGMLType.Q4_0: Layout(4, offset=8),
    GGMLType.Q4_1: Layout(4, has_m=True),
    GGMLType.Q5_0: Layout(4, 1, offset=16),
    GGMLType.Q5_1: Layout(4, 1, has_m=True),
    GGMLType.Q8_0: Layout(8),
    GGMLType.Q2_K: Layout(2, super=256, group=16, has_sc=True, has_mn=True),
    GGMLType.Q3_K: Layout(2, 1, offset=4, super=256, group=16, has_sc=True),
    GGMLType.Q4_K: Layout(4, super=256, group=32, has_sc=True, has_mn=True),
    GGMLType.Q5_K: Layout(4, 1, super=256, group=32, has_sc=True, has_mn=True),
    GGMLType.Q6_K: Layout(4, 2, offset=32, super=256, group=16, has_sc=True),
    GGMLType.IQ4_NL: Layout(4, table=True),
    GGMLType.IQ4_XS: Layout(4, table=True, super=256, group=32, has_sc=True),
}
DENSE = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
DENSE_DTYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
PACK_ROWS_BYTES = 1 << 20  # raw bytes regrouped at a time at load (bounds the temporaries)


@dataclass
class Packed:
    """A quantized matrix (n_out, n_in) as planes on one device."""

    type: GGMLType
    shape: tuple[int, int]
    planes: dict[str, torch.Tensor]

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.type]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes.values())

    def rows(self, index: torch.Tensor) -> "Packed":
        """The rows `index` (a 1-D long tensor on the planes' device), for an embedding lookup."""
        return Packed(self.type, (len(index), self.shape[1]), {k: p[index] for k, p in self.planes.items()})

    def slice(self, r0: int, r1: int) -> "Packed":
        return Packed(self.type, (r1 - r0, self.shape[1]), {k: p[r0:r1] for k, p in self.planes.items()})


# -- bit fields (torch versions of quant/kquants.py's helpers)

def _spread(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, k) bytes -> (n, 8 // bits, k): field i of every byte in row i (the order ggml packs them)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)
    return (x[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block: (n,)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).reshape(-1)


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 codes: low nibbles are weights 0-15, high nibbles 16-31."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bits_le(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes, a little-endian bit per weight -> (n, 32) of 0/1."""
    return _spread(qh, 1).transpose(1, 2).reshape(len(qh), -1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _fields(t: GGMLType, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Blocks (n, bytes) -> codes per weight in element order ("lo", "hi": (n, block)) and scales per
    block ("d", "m", "dmin": (n,); "sc", "mn": (n, groups))."""
    n = len(b)
    if t in (GGMLType.Q4_0, GGMLType.IQ4_NL):
        return {"lo": _nibbles_32(b[:, 2:18]), "d": _f16(b, 0)}
    if t == GGMLType.Q4_1:
        return {"lo": _nibbles_32(b[:, 4:20]), "d": _f16(b, 0), "m": _f16(b, 2)}
    if t == GGMLType.Q5_0:
        return {"lo": _nibbles_32(b[:, 6:22]), "hi": _bits_le(b[:, 2:6]), "d": _f16(b, 0)}
    if t == GGMLType.Q5_1:
        return {"lo": _nibbles_32(b[:, 8:24]), "hi": _bits_le(b[:, 4:8]), "d": _f16(b, 0), "m": _f16(b, 2)}
    if t == GGMLType.Q8_0:
        return {"lo": b[:, 2:34].contiguous().view(torch.int8), "d": _f16(b, 0)}
    if t == GGMLType.Q2_K:
        lo = torch.stack([_spread(b[:, 16 + 32 * h:48 + 32 * h], 2) for h in range(2)], 1).reshape(n, 256)
        s = b[:, :16]
        return {"lo": lo, "sc": s & 15, "mn": s >> 4, "d": _f16(b, 80), "dmin": _f16(b, 82)}
    if t == GGMLType.Q3_K:
        lo = torch.stack([_spread(b[:, 32 + 32 * h:64 + 32 * h], 2) for h in range(2)], 1).reshape(n, 256)
        hi = _spread(b[:, :32], 1).reshape(n, 256)
        s = b[:, 96:108]
        low, high = _spread(s[:, :8], 4).reshape(n, 16), _spread(s[:, 8:12], 2).reshape(n, 16)
        sc = ((low | (high << 4)).view(torch.int8) - 32).to(torch.int8)
        return {"lo": lo, "hi": hi, "sc": sc, "d": _f16(b, 108)}
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        qs = b[:, 16:144] if t == GGMLType.Q4_K else b[:, 48:176]
        lo = torch.stack([_spread(qs[:, 32 * c:32 * c + 32], 4) for c in range(4)], 1).reshape(n, 256)
        sc, mn = _scale_min_k4(b[:, 4:16])
        out = {"lo": lo, "sc": sc, "mn": mn, "d": _f16(b, 0), "dmin": _f16(b, 2)}
        if t == GGMLType.Q5_K:
            out["hi"] = _spread(b[:, 16:48], 1).reshape(n, 256)
        return out
    if t == GGMLType.Q6_K:
        lo = torch.stack([_spread(b[:, 64 * h:64 * h + 64], 4).reshape(n, 128) for h in range(2)], 1)
        hi = torch.stack([_spread(b[:, 128 + 32 * h:160 + 32 * h], 2).reshape(n, 128) for h in range(2)], 1)
        return {"lo": lo.reshape(n, 256), "hi": hi.reshape(n, 256), "sc": b[:, 192:208].contiguous().view(torch.int8),
                "d": _f16(b, 208)}
    if t == GGMLType.IQ4_XS:
        lo = _nibbles_32(b[:, 8:136].reshape(n * 8, 16)).reshape(n, 256)
        low = _spread(b[:, 4:8], 4).transpose(1, 2).reshape(n, 8)
        high = (b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) >>
                torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)) & 3
        sc = (low.to(torch.int32) | (high.reshape(n, 8) << 4)) - 32
        return {"lo": lo, "sc": sc.to(torch.int8), "d": _f16(b, 0)}
    raise KeyError(t)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, K) codes of `bits` bits -> (rows, K * bits / 8) bytes, element k in bits k*bits.. of its byte."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, per)
    out = c[:, :, 0].clone()
    for i in range(1, per):
        out |= c[:, :, i] << (bits * i)
    return out


def plane_shapes(t_type: GGMLType, n_out: int, n_in: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """Each plane's shape and dtype for a matrix of (n_out, n_in)."""
    lay = LAYOUTS[t_type]
    out = {"lo": ((n_out, n_in), torch.int8) if lay.lo_bits == 8 else ((n_out, n_in * lay.lo_bits // 8), torch.uint8),
           "d": ((n_out, n_in // lay.super), torch.float16)}
    if lay.hi_bits:
        out["hi"] = ((n_out, n_in * lay.hi_bits // 8), torch.uint8)
    if lay.has_m:
        out["m"] = ((n_out, n_in // 32), torch.float16)
    if lay.has_sc:
        signed = t_type in (GGMLType.Q3_K, GGMLType.Q6_K, GGMLType.IQ4_XS)
        out["sc"] = ((n_out, n_in // lay.group), torch.int8 if signed else torch.uint8)
    if lay.has_mn:
        out["mn"] = ((n_out, n_in // lay.group), torch.uint8)
        out["dmin"] = ((n_out, n_in // lay.super), torch.float16)
    return out


def pack(t_type: GGMLType, parts: list[tuple[int, np.ndarray]], n_in: int, device: torch.device) -> Packed:
    """The planes of a quantized matrix from GGUF bytes: `parts` are (rows, bytes (rows, row_bytes)) of
    matrices stacked in order (q|k|v, or one). Planes are allocated once and filled a slab of rows at a
    time, so the device holds the planes and one slab's temporaries, never a second copy."""
    lay = LAYOUTS[t_type]
    n_out = sum(n for n, _ in parts)
    block, bpb = BLOCK_INFO[t_type]
    nb = n_in // block
    planes = {k: torch.empty(shape, dtype=dt, device=device) for k, (shape, dt) in plane_shapes(t_type, n_out, n_in).items()}
    at = 0
    for _, raw in parts:
        step = max(1, PACK_ROWS_BYTES // raw.shape[1])
        for r in range(0, raw.shape[0], step):
            slab = torch.from_numpy(np.array(raw[r:r + step])).to(device)  # a copy: the file is read-only
            rows = slab.shape[0]
            f = _fields(t_type, slab.reshape(rows * nb, bpb))
            dst = slice(at + r, at + r + rows)
            lo = f["lo"].reshape(rows, n_in)
            planes["lo"][dst] = lo if lay.lo_bits == 8 else _pack(lo, lay.lo_bits)
            if lay.hi_bits:
                planes["hi"][dst] = _pack(f["hi"].reshape(rows, n_in), lay.hi_bits)
            for key in ("d", "m", "dmin", "sc", "mn"):
                if key in f:
                    planes[key][dst] = f[key].reshape(rows, -1)
        at += raw.shape[0]
    return Packed(t_type, (n_out, n_in), planes)


_levels: dict[torch.device, torch.Tensor] = {}


def levels(device: torch.device) -> torch.Tensor:
    """IQ4_LEVELS on `device`, made once (a copy to the GPU cannot happen inside a captured graph)."""
    if device not in _levels:
        _levels[device] = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)
    return _levels[device]


def _unpack(plane: torch.Tensor, bits: int, n_in: int) -> torch.Tensor:
    """(rows, n_in * bits / 8) bytes -> (rows, n_in) int32 codes."""
    if bits == 8:
        return plane.to(torch.int32)
    return _spread(plane, bits).transpose(1, 2).reshape(plane.shape[0], n_in).to(torch.int32)


def dequantize(w: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The matrix's rows as floats (computed in float32 with ggml's steps, then cast to `dtype`)."""
    lay, p = w.layout, w.planes
    n, n_in = w.shape
    code = _unpack(p["lo"], lay.lo_bits, n_in)
    if lay.hi_bits:
        code = code | (_unpack(p["hi"], lay.hi_bits, n_in) << lay.lo_bits)
    v = levels(code.device)[code] if lay.table else (code - lay.offset).to(torch.float32)
    group = lay.group if lay.has_sc else lay.super  # the finest scale: per 16 or 32 weights
    per_super = lay.super // group
    s = p["d"].to(torch.float32).repeat_interleave(per_super, dim=1)  # (n, groups), scales broadcast
    if lay.has_sc:
        s = s * p["sc"].to(torch.float32)
    out = v.view(n, n_in // group, group) * s[:, :, None]
    if lay.has_m:
        out = out + p["m"].to(torch.float32)[:, :, None]
    if lay.has_mn:
        out = out - (p["dmin"].to(torch.float32).repeat_interleave(per_super, dim=1) * p["mn"].to(torch.float32))[:, :, None]
    return out.reshape(n, n_in).to(dtype)
