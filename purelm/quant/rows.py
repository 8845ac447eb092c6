"""Row loops of the numba encoders (kencode.py, iencode.py), one per type so that a process compiles
only the types it writes. They release the GIL: purelm.quant runs several at once on threads, and
the bytes do not depend on how the rows are shared out (every row is independent)."""
from __future__ import annotations

from numba import njit

from .iencode import iq4_row, legacy_row
from .kencode import q2_k_row, q3_k_row, q45_k_row, q6_k_row
from .search import OPTS
from .types import GGMLType as T

# Each takes x (rows, n) float32, qw (n,) float32 (used when has_qw), out (rows, row_bytes) uint8.


@njit(**OPTS)
def q2_k(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        q2_k_row(x[r], qw, has_qw, out[r])


@njit(**OPTS)
def q3_k(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        q3_k_row(x[r], qw, has_qw, out[r])


@njit(**OPTS)
def q4_k(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        q45_k_row(x[r], qw, has_qw, out[r], 15)


@njit(**OPTS)
def q5_k(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        q45_k_row(x[r], qw, has_qw, out[r], 31)


@njit(**OPTS)
def q6_k(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        q6_k_row(x[r], qw, has_qw, out[r])


@njit(**OPTS)
def iq4_nl(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        iq4_row(x[r], qw, has_qw, out[r], 32)


@njit(**OPTS)
def iq4_xs(x, qw, has_qw, out):
    for r in range(x.shape[0]):
        iq4_row(x[r], qw, has_qw, out[r], 256)


@njit(**OPTS)
def weighted_legacy(x, qw, nmax, with_min, out):
    """Q4_0/Q4_1/Q5_0/Q5_1 with an importance matrix (nmax 8/15/16/31, with_min for _1)."""
    for r in range(x.shape[0]):
        legacy_row(x[r], qw, out[r], nmax, with_min)


KERNELS = {T.Q2_K: q2_k, T.Q3_K: q3_k, T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k,
           T.IQ4_NL: iq4_nl, T.IQ4_XS: iq4_xs}
LEGACY = {T.Q4_0: (8, 0), T.Q4_1: (15, 1), T.Q5_0: (16, 0), T.Q5_1: (31, 1)}


def encode(qtype: T, x, qw, has_qw: bool, out) -> None:
    """Encode the rows of x (C-contiguous float32) into out with qtype's kernel."""
    if qtype in LEGACY:
        nmax, with_min = LEGACY[qtype]
        weighted_legacy(x, qw, nmax, with_min, out)
    else:
        KERNELS[qtype](x, qw, has_qw, out)
