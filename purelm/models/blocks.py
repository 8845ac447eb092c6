"""Pieces several architectures share, written once: position encodings' parameters and small helpers.
Model files compose these with the backend ops; nothing here knows which backend runs."""
from __future__ import annotations

import math

import numpy as np


def alibi_slopes(n_head: int, max_bias: float = 8.0) -> np.ndarray:
    """ALiBi head slopes as llama.cpp computes them (ggml_soft_max_ext with max_bias), float32.

    With n_head not a power of two, the first 2^floor(log2 n) heads use m0 powers and the rest use
    interleaved m1 powers, as in the ALiBi paper and BLOOM."""
    n_floor = 2 ** math.floor(math.log2(n_head))
    m0 = 2.0 ** (-max_bias / n_floor)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_floor)
    h = np.arange(n_head)
    slopes = np.where(h < n_floor, m0 ** (h + 1), m1 ** (2 * (h - n_floor) + 1))
    return slopes.astype(np.float32)
