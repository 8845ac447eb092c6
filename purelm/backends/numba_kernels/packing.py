"""Repacking GGUF blocks for the decode kernels (done once, at load).

A matrix is cut into groups of R consecutive rows ("lanes"). Within a group every field is stored
lane-minor, `[..., R]`: the kernels then read R rows' bytes for one weight position with one vector
load and multiply them all by the same broadcast x value, so no horizontal sums are needed. The rows
past the end of the last group are zero. Scales stay f16 (converted in the kernel) so a repacked
matrix has the same size as the file's blocks, give or take a few bytes per 256 weights.

Three families cover the types the kernels read:

- Nibble (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K): per 32-weight sub-block 16 bytes, byte j holding weight j
  (low nibble) and weight j+16 (high nibble); 5-bit types add a uint32 of high bits (bit i: weight i).
  Scales: mode 0 (d per sub-block, value d*(q+offset)), mode 1 (d, m per sub-block, d*q + m), mode 2
  (K-quants: f16 d, dmin per 256 and 6-bit sc, mn per 32, d*sc*q - dmin*mn).
- Q8_0: 32 int8 per block and an f16 d.
- Q6_K: per 32-weight sub-block 16 bytes of low nibbles (as above) and 8 bytes of high 2-bit pairs
  (byte j: weights j, j+8, j+16, j+24), int8 scales per 16 weights and f16 d per 256.

"Dot" layouts (families nibble_dot for Q4_0, Q4_1, Q4_K, five_dot for Q5_0, Q5_1, Q5_K, q6k_dot for Q6_K
and q8_dot for Q8_0), for the int16 kernels (x86 CPUs with AVX2, see intrinsics.has_int16_dot): the same scale
fields, but the weight bytes of a group go 4 per row side by side, `qs[g, b, k, 4 * r + i]` = byte
4k + i of row r's sub-block, so that one 32-bit lane holds 4 consecutive weights of one row (what
vpmaddwd multiplies with 4 activations, two at a time). 5- and 6-bit weights keep their low nibbles
so, followed by one or two 4-byte "plane" words per row of their high bits (`_planes`): the sub-block
stays the file's size, and the kernel ORs the bits back in registers. Q6_K's dot layout keeps int8
scales per 16 weights (sc) and f16 d per 256.

Dot-only layouts (DOT_ONLY_TYPES: no float32 kernels read them, so they are repacked only where the int16
kernels run), the same 4-bytes-a-row runs: Q2_K and Q3_K ("crumbs", q2k_dot/q3k_dot) keep 2 bits a
weight, 8 bytes per 32 weights (_crumb_fields: byte 4j + i holds weights 4(j + 2c) + i, c = 0..3), Q3_K
then 4 plane bytes of third bits; scales per 16 weights as Q6_K's (Q3_K: int8 sc - 32; Q2_K: the file's
bytes, sc | mn << 4, with f16 d and dmin per 256). IQ4_NL and IQ4_XS (iq4_dot) keep the nibble layout
of 4-bit codes, which the kernel turns into the 16 non-linear levels with one table shuffle (vpshufb);
IQ4_XS's 6-bit scales become int8 per 32. Bytes per 256 weights against the file's: Q2_K 84 = 84,
Q3_K 114 / 110, IQ4_NL 144 = 144, IQ4_XS 138 / 136.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...quant.kquants import scale_min_k4
from ...quant.types import BLOCK_INFO, GGMLType

NIBBLE_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K)
PACKED_TYPES = frozenset(NIBBLE_TYPES + (GGMLType.Q8_0, GGMLType.Q6_K))
# Types with a dot layout only (repacked only where the int16 kernels run; else read as the file's rows)
DOT_ONLY_TYPES = frozenset((GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS))
DOT_TYPES = frozenset(NIBBLE_TYPES + (GGMLType.Q8_0, GGMLType.Q6_K)) | DOT_ONLY_TYPES
BYTES = 3  # scale mode of Q8_0 in the dot layout (a weight a byte); modes 0-2 are the nibble types'
FIVE_BIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K)
SIX = 4  # scale mode of Q6_K in the dot layout: d * sc * (q - 32), sc per 16 weights
# The dot-only types' scale modes: Q3_K d * sc * q (int8 sc per 16 weights, q - 4 in the kernel, as
# SIX); Q2_K d * sc * q - dmin * mn, sc | mn << 4 per 16 weights (the file's bytes); IQ4_NL d * level
# per 32; IQ4_XS d * sc * level, int8 sc per 32.
THREE, TWO, LEVELS, LEVELS_K = 5, 6, 7, 8

# Rows per group: 64 keeps several independent vector accumulators in flight per weight column.
DEFAULT_LANES = 64
CHUNK_BYTES = 1 << 20  # file bytes repacked at once: the temporaries are a few times this


@dataclass
class Packed:
    """A repacked matrix: `family` picks the kernel, `arrays` its fields (see the module doc)."""

    qtype: GGMLType
    family: str  # "nibble", "q8", "q6k"; dot layouts "nibble_dot", "five_dot", "q6k_dot", "q8_dot",
    # and the dot-only "q2k_dot", "q3k_dot", "iq4_dot"
    n_out: int
    n_in: int
    lanes: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    mode: int = 0  # nibble scale mode
    offset: float = 0.0  # nibble mode 0: the constant added to q (-8 or -16)

    @property
    def n_groups(self) -> int:
        return -(-self.n_out // self.lanes)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def kernel_args(self) -> tuple:
        """The leading arguments of this family's kernels (packed.matvec_* and packed.unpack_*)."""
        a = self.arrays
        if self.family == "nibble":
            return a["qs"], a["qh"], a["d"], a["m"], a["sc"], a["mn"], self.mode, np.float32(self.offset)
        if self.family.endswith("_dot"):  # the dot layouts' kernels share arguments (Q8_0: mode BYTES)
            return a["qs"], a["d"], a["m"], a["sc"], a["mn"], self.mode, np.float32(self.offset)
        if self.family == "q8":
            return a["qs"], a["d"]
        return a["qs"], a["qh"], a["sc"], a["d"]

    @property
    def n_sub(self) -> int:
        """Units a row is split into for parallel work (the kernels' column loop)."""
        return self.arrays["qs"].shape[1]


def column_splits(n_groups: int, n_sub: int, threads: int) -> int:
    """How many column ranges to cut each group into so that a decode token's work items spread
    over the threads. Only where whole groups would leave the threads under 75% busy (one group on
    two threads): each cut adds items and a serial sum of their parts, and SmolLM2's 9-group
    matrices decoded faster uncut on 2 threads (benchmarks/README.md, "A decode token's column splits")."""
    return _even_cuts(n_groups, threads, min(4, max(1, n_sub // 2)), 0.75)


def token_ranges(n_groups: int, n_tok: int, threads: int) -> int:
    """How many token ranges to cut a batch's rows into (packed.token_splits) so that its work items
    spread over the threads to within 5% of even; each token's sums stay those of a decode step, and
    no sums of column ranges are added up afterwards. 4 tokens a range at least (the batch kernels'
    step), at most 8 ranges."""
    return _even_cuts(n_groups, threads, min(8, max(1, n_tok // 4)), 0.95)


def _even_cuts(n_groups: int, threads: int, most: int, even: float) -> int:
    """The fewest cuts of each group, up to `most`, that keep the threads busy for at least the
    fraction `even` of the time the slowest takes."""
    for n in range(1, most):
        items = n_groups * n
        if items / (-(-items // threads) * threads) >= even:
            return n
    return most


def _u16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The uint16 at byte `offset` of every block (..., nbytes) -> (...)."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view("<u2")[..., 0]


def _u32(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 4]).view("<u4")[..., 0]


def _nibble_bytes(q: np.ndarray) -> np.ndarray:
    """(..., 32) values < 16 -> (..., 16) bytes: byte j = q[j] | q[j+16] << 4."""
    return (q[..., :16] & 0x0F) | (q[..., 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit values -> (...) uint32 whose bit i is bit 4 of q[i]."""
    bits = (q >> 4).astype(np.uint32) & 1
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)


def _k_values(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: (..., 128) bytes -> (..., 8, 32) 4-bit values in weight order."""
    chunks = qs.reshape(qs.shape[:-1] + (4, 1, 32))
    both = np.concatenate([chunks & 0x0F, chunks >> 4], axis=-2)  # (..., 4, 2, 32)
    return both.reshape(qs.shape[:-1] + (8, 32))


def _fields(qtype: GGMLType, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """Integer fields of `blocks` (rows, n_blocks, block_bytes), rows first, in the packed order."""
    n, nb = blocks.shape[:2]
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1):
        has_min = qtype in (GGMLType.Q4_1, GGMLType.Q5_1)
        at = 4 if has_min else 2
        out = {"d": _u16(blocks, 0)}
        if has_min:
            out["m"] = _u16(blocks, 2)
        if qtype in (GGMLType.Q5_0, GGMLType.Q5_1):
            out["qh"] = _u32(blocks, at)  # already bit i = high bit of weight i
            at += 4
        out["qs"] = np.ascontiguousarray(blocks[..., at:at + 16])  # already byte j = w[j] | w[j+16] << 4
        return out
    if qtype == GGMLType.Q8_0:
        return {"d": _u16(blocks, 0), "qs": np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)}
    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        sc, mn = scale_min_k4(blocks[..., 4:16].reshape(n * nb, 12))
        out = {"d": _u16(blocks, 0), "m": _u16(blocks, 2),
               "sc": sc.reshape(n, nb * 8).astype(np.uint8), "mn": mn.reshape(n, nb * 8).astype(np.uint8)}
        if qtype == GGMLType.Q4_K:
            q = _k_values(blocks[..., 16:144])
        else:
            q = _k_values(blocks[..., 48:176])
            qh = blocks[..., 16:48]  # bit k of byte i: bit 4 of weight i of sub-block k
            q = q | (((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
            out["qh"] = _high_bits(q).reshape(n, nb * 8)
        out["qs"] = _nibble_bytes(q).reshape(n, nb * 8, 16)
        return out
    if qtype == GGMLType.Q6_K:
        ql = blocks[..., 0:128].reshape(n, nb, 2, 1, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(n, nb, 2, 4, 32)
        qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = (low | (high << 4)).reshape(n, nb * 8, 32)  # 6-bit values in weight order
        h = q >> 4
        qh_packed = h[..., 0:8] | (h[..., 8:16] << 2) | (h[..., 16:24] << 4) | (h[..., 24:32] << 6)
        scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).reshape(n, nb * 16)
        return {"d": _u16(blocks, 208), "sc": scales, "qs": _nibble_bytes(q), "qh": qh_packed.astype(np.uint8)}
    if qtype in (GGMLType.Q2_K, GGMLType.Q3_K):
        return _crumb_fields(qtype, blocks)
    if qtype == GGMLType.IQ4_NL:  # qs as Q4_0's; no sc, but typed as IQ4_XS's (one compile of the kernels for both)
        return {"d": _u16(blocks, 0), "sc": np.zeros((n, 0), np.int8),
                "qs": np.ascontiguousarray(blocks[..., 2:18]).reshape(n, nb, 16)}
    if qtype == GGMLType.IQ4_XS:
        low = (blocks[..., 4:8, None] >> np.array([0, 4], np.uint8)) & 15  # 4 + 2 bits per 32 weights
        high = (_u16(blocks, 2)[..., None] >> np.arange(0, 16, 2, dtype=np.uint16)).astype(np.uint8) & 3
        sc = (low.reshape(n, nb, 8) | (high << 4)).astype(np.int8) - np.int8(32)
        return {"d": _u16(blocks, 0), "sc": sc.reshape(n, nb * 8),
                "qs": np.ascontiguousarray(blocks[..., 8:136]).reshape(n, nb * 8, 16)}
    raise ValueError(f"{qtype.name} has no packed layout")


def _crumb_fields(qtype: GGMLType, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """Q2_K/Q3_K (rows, n_blocks, bytes) -> the crumb dot layout's fields: per 32 weights 8 bytes of
    2-bit weights, byte 4j + i holding weight 4(j + 2c) + i at bits 2c, 2c+1 (so that a 4-byte group's
    crumb c is 4 consecutive weights: intrinsics._dot_block_codegen), and Q3_K 4 plane bytes, bit w of
    byte i weight 4w + i's third bit. Scales per 16 weights: Q3_K int8 (sc - 32), Q2_K the file's bytes."""
    n, nb = blocks.shape[:2]
    at = 16 if qtype == GGMLType.Q2_K else 32
    qs = blocks[..., at:at + 64].reshape(n, nb, 2, 1, 32)
    low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # weight 128h + 32s + l
    crumbs = low.reshape(n, nb * 8, 4, 2, 4)  # per 32 weights: [c, j, i] = weight 8c + 4j + i
    out = {"qs": (crumbs << (2 * np.arange(4, dtype=np.uint8))[:, None, None]).sum(axis=2, dtype=np.uint8)
           .reshape(n, nb * 8, 8)}
    if qtype == GGMLType.Q2_K:
        sc = np.ascontiguousarray(blocks[..., 0:16]).reshape(n, nb * 16)
        out.update(d=_u16(blocks, 80), m=_u16(blocks, 82), sc=sc)
        return out
    hmask = blocks[..., 0:32]  # bit k of byte l: weight 32k + l
    high = ((hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, nb * 8, 8, 4)  # [w, i]
    plane = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8)  # byte i, bit w
    out["qs"] = np.concatenate([out["qs"], plane], axis=-1)
    scales = blocks[..., 96:108]
    low4 = np.concatenate([scales[..., :8] & 15, scales[..., :8] >> 4], axis=-1)
    high2 = ((scales[..., None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, nb, 16)
    out.update(d=_u16(blocks, 108), sc=((low4 | (high2 << 4)).astype(np.int8) - np.int8(32)).reshape(n, nb * 16))
    return out


def _planes(high: np.ndarray, bits: int) -> np.ndarray:
    """(..., 32) high parts (< 2**bits) of a sub-block's weights in order -> (..., 4 * bits) plane bytes:
    with k = 2j + h, weight 16h + 4j + i (nibble half h of 4-byte group j, byte i) has its bits at bit
    (k * bits) % 8 of byte 4p + i, p = k * bits // 8 (the order intrinsics._dot_block_codegen reads)."""
    shape = high.shape[:-1]
    by_k = np.swapaxes(high.reshape(shape + (2, 4, 4)), -3, -2).reshape(shape + (8, 4)).astype(np.uint8)
    planes = np.zeros(shape + (bits, 4), np.uint8)
    for k in range(8):
        planes[..., k * bits // 8, :] |= by_k[..., k, :] << np.uint8(k * bits % 8)
    return planes.reshape(shape + (4 * bits,))


def _dot_fields(qtype: GGMLType, fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """_fields' output -> the dot layouts' fields: 5- and 6-bit types' high bits move from qh into
    plane bytes after each sub-block's nibble bytes in qs."""
    if qtype in FIVE_BIT:
        qh = fields.pop("qh")  # (rows, units) uint32, bit i: weight i
        fields["qs"] = np.concatenate([fields["qs"], _planes((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1, 1)],
                                      axis=-1)
    elif qtype == GGMLType.Q6_K:
        qh = fields.pop("qh")  # (rows, units, 8), byte j: weights j, j+8, j+16, j+24 at bits 0-1, 2-3, 4-5, 6-7
        high = (qh[..., None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [.., m, j]: weight 8m + j
        fields["qs"] = np.concatenate([fields["qs"], _planes(high.reshape(qh.shape[:-1] + (32,)), 2)], axis=-1)
    return fields


def _to_groups(a: np.ndarray, lanes: int) -> np.ndarray:
    """(rows, ...) with rows a multiple of lanes -> (groups, ..., lanes), contiguous."""
    g = a.reshape((a.shape[0] // lanes, lanes) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(g, 1, -1))


def _to_dot_groups(qs: np.ndarray, lanes: int) -> np.ndarray:
    """Weight bytes (rows, units, bytes) -> (groups, units, bytes // 4, lanes * 4): per group, unit
    and run of 4 bytes, each row's 4 bytes side by side (the dot layouts)."""
    rows, units, width = qs.shape
    g = qs.reshape(rows // lanes, lanes, units, width // 4, 4)
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1, 4)).reshape(rows // lanes, units, width // 4, lanes * 4)


Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class Arena:
    """Hands out arrays carved from large buffers. The kernels stream through every weight for every
    token: in a few big buffers the kernel backs them with 2 MiB pages (numpy asks for transparent huge
    pages on large allocations), which saves a TLB miss per 4 KiB (measured ~15% of decode time)."""

    def __init__(self, chunk_bytes: int = 32 << 20, align: int = 64) -> None:
        self.chunk_bytes, self.align = chunk_bytes, align
        self.chunk = np.empty(0, np.uint8)
        self.used = 0

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > self.chunk_bytes // 4:
            return np.empty(shape, dtype)  # large enough to get huge pages by itself
        start = -(-self.used // self.align) * self.align
        if start + nbytes > self.chunk.size:
            self.chunk = np.empty(self.chunk_bytes, np.uint8)
            start = 0
        self.used = start + nbytes
        return self.chunk[start:start + nbytes].view(dtype).reshape(shape)


def _row_chunks(parts: list[np.ndarray], chunk: int, release: Callable[[np.ndarray], None] | None):
    """(first row, rows) of the row-wise concatenation of `parts`, `chunk` rows at a time, only a
    chunk ever copied. `release` gets each source slice once it has been read."""
    bounds = np.cumsum([0] + [p.shape[0] for p in parts])
    for start in range(0, int(bounds[-1]), chunk):
        end = min(start + chunk, int(bounds[-1]))
        pieces = []
        for p, lo in zip(parts, bounds[:-1]):
            a, b = max(start - lo, 0), min(end - lo, p.shape[0])
            if a < b:
                pieces.append(p[a:b])
        rows = np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)
        if release is not None:
            for piece in pieces:
                release(piece)
        yield start, rows


def pack(qtype: GGMLType, data: np.ndarray | list[np.ndarray], n_in: int, lanes: int = DEFAULT_LANES,
         alloc: Allocator | None = None, release: Callable[[np.ndarray], None] | None = None,
         dot: bool = False) -> Packed:
    """Repack `data` (rows, row_bytes) of a `qtype` matrix with rows of `n_in` weights; a list of such
    arrays is packed as their concatenation (q|k|v). `alloc(shape, dtype)` provides the arrays (default
    np.empty); `release(rows)` is called on each slice of `data` once it is copied (to drop the file's
    pages as the copy grows, not after). `dot`: the dot layout, for the types that have one."""
    alloc = alloc or (lambda shape, dtype: np.empty(shape, dtype))
    qtype = GGMLType(qtype)
    block, size = BLOCK_INFO[qtype]
    parts = list(data) if isinstance(data, (list, tuple)) else [data]
    n_out = sum(p.shape[0] for p in parts)
    n_groups = -(-n_out // lanes)
    dot = dot and qtype in DOT_TYPES and lanes % 16 == 0  # the dot kernels take rows 16 at a time
    if qtype in DOT_ONLY_TYPES:
        if not dot:
            raise ValueError(f"{qtype.name} has only a dot layout (int16 kernels, lanes a multiple of 16)")
        family = {GGMLType.Q2_K: "q2k_dot", GGMLType.Q3_K: "q3k_dot"}.get(qtype, "iq4_dot")
    else:
        family = "nibble" if qtype in NIBBLE_TYPES else {GGMLType.Q8_0: "q8", GGMLType.Q6_K: "q6k"}[qtype]
    if dot and qtype not in DOT_ONLY_TYPES:
        family = "five_dot" if qtype in FIVE_BIT else family + "_dot"
    packed = Packed(qtype, family, n_out, n_in, lanes)
    chunk = max(1, CHUNK_BYTES // (parts[0].shape[1] * lanes)) * lanes
    for start, rows in _row_chunks(parts, chunk, release):
        n_rows = -(-rows.shape[0] // lanes) * lanes
        if n_rows != rows.shape[0]:
            rows = np.concatenate([rows, np.zeros((n_rows - rows.shape[0], rows.shape[1]), np.uint8)])
        fields = _fields(qtype, rows.reshape(n_rows, n_in // block, size))
        if dot:
            fields = _dot_fields(qtype, fields)
        del rows
        for name, value in fields.items():
            grouped = _to_dot_groups(value, lanes) if dot and name == "qs" else _to_groups(value, lanes)
            if name not in packed.arrays:
                packed.arrays[name] = alloc((n_groups,) + grouped.shape[1:], grouped.dtype)
            g0 = start // lanes
            packed.arrays[name][g0:g0 + grouped.shape[0]] = grouped
    if family == "nibble" or dot:  # kernels taking the nibble family's fields
        modes = {GGMLType.Q4_0: 0, GGMLType.Q5_0: 0, GGMLType.Q4_1: 1, GGMLType.Q5_1: 1, GGMLType.Q8_0: BYTES,
                 GGMLType.Q6_K: SIX, GGMLType.Q3_K: THREE, GGMLType.Q2_K: TWO, GGMLType.IQ4_NL: LEVELS,
                 GGMLType.IQ4_XS: LEVELS_K}
        packed.mode = modes.get(qtype, 2)
        packed.offset = {GGMLType.Q4_0: -8.0, GGMLType.Q5_0: -16.0}.get(qtype, 0.0)
        empty_u8 = np.zeros((n_groups, 0, lanes), np.uint8)  # fields a type does not have
        packed.arrays.setdefault("qh", np.zeros((n_groups, 0, lanes), np.uint32))
        packed.arrays.setdefault("m", np.zeros((n_groups, 0, lanes), np.uint16))
        packed.arrays.setdefault("sc", empty_u8)
        packed.arrays.setdefault("mn", empty_u8)
    if qtype in NIBBLE_TYPES:
        n_sub = n_in // 32
        quads = 4 + (qtype in FIVE_BIT)  # + a plane of high bits
        assert packed.arrays["qs"].shape == ((n_groups, n_sub, quads, 4 * lanes) if dot else (n_groups, n_sub, 16, lanes))
    return packed
