"""Compile options and small helpers shared by every kernel."""
from __future__ import annotations

import numpy as np
from numba import njit

# reassoc/contract let LLVM vectorize reductions and fuse multiply-adds. No nnan/ninf: weights with
# corrupt (inf/NaN) scales must give inf/NaN as the reference does, not whatever LLVM assumes.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
OPTS = dict(cache=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False, nogil=True)
PARALLEL = dict(OPTS, parallel=True)
# Attention adds `nnan` (finite inputs give no NaN scores; masked keys are skipped, never -inf): with
# it LLVM vectorizes more of the softmax (measured ~52 -> ~45 us per decode layer at 513 positions).
SOFTMAX_OPTS = dict(OPTS, fastmath=FASTMATH | {"nnan"})
SOFTMAX_PARALLEL = dict(SOFTMAX_OPTS, parallel=True)

# Bytes a kernel prefetches ahead of the block it works on: the hardware prefetcher alone leaves
# these compute-heavy loops waiting on memory. 8 KiB ahead keeps more lines in flight than 2 KiB did;
# 16 KiB was slower on small matrices (figures: benchmarks/README.md, "Prefetch distance").
PREFETCH_BYTES = 8192


@njit(cache=True, inline="always")
def at(i):
    """An index numba knows is non-negative. For a signed index it cannot prove so (anything but a
    range() counter from 0), numba adds a wraparound test that keeps LLVM from vectorizing the loop
    (measured 1.6-6x slower loops)."""
    return np.uint64(i)
