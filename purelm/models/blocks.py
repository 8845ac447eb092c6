"""Pieces several architectures share, written once: position encodings' parameters and small helpers.
Model files compose these with the backend ops; nothing here knows which backend runs."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def alibi_slopes(n_head: int, max_bias: float = 8.0) -> np.ndarray:
    """ALiBi head slopes as llama.cpp computes them (ggml_soft_max_ext with max_bias), float32.

    With n_head not a power of two, the first 2^floor(log2 n) heads use m0 powers and the rest use
    interleaved m1 powers, as in the ALiBi paper and BLOOM."""
    n_floor = 2 ** math.floor(math.log2(n_head))
    m0 = 2.0 ** (-max_bias / n_floor)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_floor)
    h = np.arange(n_head)
    with np.errstate(divide="ignore", over="ignore"):  # np.where computes both branches for every head
        slopes = np.where(h < n_floor, m0 ** (h + 1), m1 ** (2 * (h - n_floor) + 1))
    return slopes.astype(np.float32)


def qkv_blocks(x: np.ndarray, n_head: int) -> np.ndarray:
    """A fused q|k|v weight (or bias) stored per head, rows [head][q,k,v][head_dim] (BLOOM, GPT-NeoX in
    Hugging Face), reordered to [q,k,v][head][head_dim] as llama.cpp's converter writes attn_qkv."""
    return x.reshape(n_head, 3, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def hf_rope_parameters(cfg: dict) -> dict:
    """A Hugging Face config's rotary settings as one dict, however the config spells them: older
    configs put `rope_theta`, `rope_scaling` (with `type`), `partial_rotary_factor` / `rope_pct` and
    `original_max_position_embeddings` at the top level; transformers >= 5 nests them in
    `rope_parameters` (with `rope_type`). Keys: rope_theta, rope_type, partial_rotary_factor, ..."""
    out = {k: cfg[k] for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
           if cfg.get(k) is not None}
    if cfg.get("rope_pct") is not None:
        out.setdefault("partial_rotary_factor", cfg["rope_pct"])
    out.update(cfg.get("rope_scaling") or {})
    out.update(cfg.get("rope_parameters") or {})
    if "type" in out:
        out.setdefault("rope_type", out["type"])
    return out


def add_bias(x: Any, bias: Any) -> Any:
    """x + bias, or x when the (optional) bias is absent."""
    return x if bias is None else x + bias
