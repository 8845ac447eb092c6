"""Mixture-of-experts weights and decode kernels for the numba backend (models/experts.py).

ExpertStack: one layer's 3-D expert tensor (gate|up pairs, or down) repacked into ONE set of arrays,
expert e's groups of rows at [e·G, (e+1)·G). The arrays are reserved at the first expert's use but
only written (so only made resident) expert by expert, each the first time a token picks it; an
expert's matrix is a view of its rows there, used by the ordinary kernels. Experts no token picks are
never read from the file nor repacked.

Decode (one token): the picked experts' gate|up rows in one parallel kernel call (every listed group
times the token), then their down rows in another, each group against its own expert's activations;
the work items are packed.dot_item's, so every product has the bits the per-expert kernels give it.
"""
from __future__ import annotations

import mmap
import threading
from typing import Callable

import numpy as np
from numba import njit, prange

from ...formats.gguf import Tensor
from . import packed as pk
from .common import OPTS, PARALLEL
from .intrinsics import BYTE_QUADS, FIVE_QUADS, NIBBLE_QUADS, SIX_QUADS
from .ops import geglu, swiglu
from ..pages import release_file_pages
from .packing import Packed


class ExpertStack:
    """The experts of one 3-D tensor (or gate|up pair of them), repacked on first use into shared
    arrays. `sources[e]`: expert e's tensors (rows concatenated when packed)."""

    def __init__(self, sources: list[list[Tensor]]) -> None:
        self.sources = sources
        self.n_expert = len(sources)
        self.big: Packed | None = None  # all experts' arrays; rows of unfilled experts never written
        self.filled = np.zeros(self.n_expert, bool)
        self.views: list[Packed | None] = [None] * self.n_expert
        self.lock = threading.Lock()
        self.groups = 0  # groups of rows per expert
        self._rows: dict[int, np.ndarray] = {}

    def fill(self, e: int, repack: Callable[[list[Tensor]], Packed]) -> Packed:
        """Expert e repacked (by `repack`), copied into the shared arrays; its view there."""
        with self.lock:
            if self.views[e] is not None:
                return self.views[e]
            p = repack(self.sources[e])
            if self.big is None:
                self.groups = p.n_groups
                arrays = {k: _untouched((self.n_expert * p.n_groups,) + a.shape[1:], a.dtype) for k, a in p.arrays.items()}
                self.big = Packed(p.qtype, p.family, self.n_expert * p.n_groups * p.lanes, p.n_in, p.lanes, arrays,
                                  p.mode, p.offset)
            big, g = self.big, self.groups
            if (p.n_groups, p.family, p.mode, p.offset) != (g, big.family, big.mode, big.offset):
                raise ValueError("experts of one tensor repacked differently")
            view = Packed(p.qtype, p.family, p.n_out, p.n_in, p.lanes, {}, p.mode, p.offset)
            for k, a in p.arrays.items():
                rows = big.arrays[k][e * g:(e + 1) * g]
                rows[...] = a
                view.arrays[k] = rows
                release_file_pages(a)  # where it came mapped from the pack cache: copied, not needed
            self.views[e], self.filled[e] = view, True
            return view

    def rows_of(self, k: int) -> np.ndarray:
        """For group_ids of k experts: each group's expert's position, 0..k-1."""
        got = self._rows.get(k)
        if got is None:
            got = self._rows[k] = np.repeat(np.arange(k), self.groups)
        return got

    def group_ids(self, experts: np.ndarray) -> np.ndarray:
        """The groups of rows of `experts`, in their order."""
        return (np.asarray(experts, np.int64)[:, None] * self.groups + np.arange(self.groups)).reshape(-1)


def _untouched(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zero-filled anonymous memory that takes no RAM until written, in 4 KiB pages: numpy would ask
    for 2 MiB pages for an array this large, and writing one expert would then make its neighbours'
    rows resident too (a short prompt's RSS went from 0.68x to 1.05x the file's size)."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, n * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype, count=n).reshape(shape)


NO_PARTS = np.zeros((0, 0, 0), np.float32)


@njit(**OPTS, inline="always")
def _setup(kind, int8, qs, mode, x, no_parts):
    if int8:
        return pk.dot8_setup(kind, qs, mode, x, no_parts)
    return pk.dot_setup(kind, qs, mode, x, no_parts)


@njit(**OPTS, inline="always")
def _same_x(kind, int8, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    """y[0, rows of g] = x[0] · W[rows of g] for each listed group g (one token, many experts)."""
    _, flat, xs, n_words, dx, xq_sums, n_sub, width = _setup(kind, int8, qs, mode, x, no_parts)
    for i in prange(groups.size):
        pk.dot_item(kind, int8, groups[i], flat, d, m, sc, mn, mode, offset, xs, n_words, dx, xq_sums, y,
                    no_parts, n_sub, width)


@njit(**OPTS, inline="always")
def _own_x(kind, int8, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    """y[j, rows of g] = x[j] · W[rows of g] for each listed group g and its row j = rows[i]."""
    _, flat, xs, n_words, dx, xq_sums, n_sub, width = _setup(kind, int8, qs, mode, x, no_parts)
    for i in prange(groups.size):
        j = rows[i]
        pk.dot_item(kind, int8, groups[i], flat, d, m, sc, mn, mode, offset, xs[j * n_words:(j + 1) * n_words],
                    n_words, dx[j:j + 1], xq_sums[j:j + 1], y[j:j + 1], no_parts, n_sub, width)


# One kernel per layout and activation width, as packed.py has them (the kind a constant in each).
@njit(**PARALLEL)
def same_x_nibbles(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(NIBBLE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x_nibbles(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(NIBBLE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x8_nibbles(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(NIBBLE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x8_nibbles(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(NIBBLE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x_five(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(FIVE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x_five(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(FIVE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x8_five(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(FIVE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x8_five(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(FIVE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x_six(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(SIX_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x_six(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(SIX_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x_bytes(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(BYTE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x_bytes(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(BYTE_QUADS, False, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


@njit(**PARALLEL)
def same_x8_bytes(qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts):
    _same_x(BYTE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, no_parts)


@njit(**PARALLEL)
def own_x8_bytes(qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts):
    _own_x(BYTE_QUADS, True, qs, d, m, sc, mn, mode, offset, x, y, groups, rows, no_parts)


# each per-expert decode kernel -> the fused pair making the same work items
FUSED = {pk.matvec_dot_nibbles: (same_x_nibbles, own_x_nibbles), pk.matvec_dot_five: (same_x_five, own_x_five),
         pk.matvec_dot_six: (same_x_six, own_x_six), pk.matvec_dot_bytes: (same_x_bytes, own_x_bytes)}
for _name, _pair in (("matvec_dot8_nibbles", (same_x8_nibbles, own_x8_nibbles)),
                     ("matvec_dot8_five", (same_x8_five, own_x8_five)),
                     ("matvec_dot8_bytes", (same_x8_bytes, own_x8_bytes))):
    if hasattr(pk, _name):
        FUSED[getattr(pk, _name)] = _pair


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")  # no fastmath: no fused multiply-adds
def mix_picked(y, picks, width, w, out):
    """out[0] = Σ_j y[j, picks[j]·width + c] · w[j] over the n = out.shape[1] columns c, added in the
    order j = 0, 1, ... and rounded as numpy's `a * w` then `+` round them (Backend.expert_ffn's bits)."""
    n = out.shape[1]
    base = picks[0] * width
    for c in range(n):
        out[0, c] = y[0, base + c] * w[0]
    for j in range(1, picks.size):
        base = picks[j] * width
        for c in range(n):
            out[0, c] = out[0, c] + y[j, base + c] * w[j]


@njit(**OPTS)
def route_rows(logits, n_used, sigmoid, normalize, min_sum, top, w):
    """Backend.route for each row of logits (tokens, n_expert) into top and w (tokens, n_used): the same
    steps as the numpy reference, a row at a time, so that a token's experts and weights are the same
    whatever rows share the call."""
    n_expert = logits.shape[1]
    p = np.empty(n_expert, np.float32)
    taken = np.empty(n_expert, np.bool_)
    one = np.float32(1)
    for t in range(logits.shape[0]):
        row = logits[t]
        if sigmoid:
            for e in range(n_expert):
                p[e] = one / (one + np.exp(-row[e]))
        else:
            top_logit = row[0]
            for e in range(1, n_expert):
                top_logit = max(top_logit, row[e])
            total = np.float32(0)
            for e in range(n_expert):
                p[e] = np.exp(row[e] - top_logit)
                total += p[e]
            for e in range(n_expert):
                p[e] = p[e] / total
        taken[:] = False
        for k in range(n_used):  # the largest untaken p; equal ones (and NaN, never larger): lower expert first
            best = -1
            for e in range(n_expert):
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            top[t, k] = best
            w[t, k] = p[best]
        if normalize:
            total = np.float32(0)
            for k in range(n_used):
                total += w[t, k]
            total = max(total, min_sum)
            for k in range(n_used):
                w[t, k] = w[t, k] / total


@njit(**OPTS)
def expert_groups(picks, filled_a, groups_a, filled_b, groups_b):
    """ExpertStack.group_ids of the picked experts in two stacks (gate|up, down), or two empty arrays
    where one of them is not yet repacked in either stack."""
    ids_a, ids_b = np.empty(picks.size * groups_a, np.int64), np.empty(picks.size * groups_b, np.int64)
    for j in range(picks.size):
        e = picks[j]
        if not (filled_a[e] and filled_b[e]):
            return ids_a[:0], ids_b[:0]
        for g in range(groups_a):
            ids_a[j * groups_a + g] = e * groups_a + g
        for g in range(groups_b):
            ids_b[j * groups_b + g] = e * groups_b + g
    return ids_a, ids_b


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def glu_picked(y, picks, width, n, silu, out):
    """out[j] = act(gate) * up of picked expert j's gate|up products, y[picks[j] * width:][:2n] (gate, then
    up): each row by ops.swiglu / ops.geglu, as for the rows of one expert."""
    for j in range(picks.size):
        at = picks[j] * width
        if silu:
            swiglu(y[at:at + n], 0, y[at + n:at + 2 * n], 0, out[j:j + 1])
        else:
            geglu(y[at:at + n], 0, y[at + n:at + 2 * n], 0, out[j:j + 1])
