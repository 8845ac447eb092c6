"""The reference backend: plain numpy, float32, written for exactness and clarity rather than speed.

Weights stay packed; `linear` dequantizes a bounded slab of rows at a time and multiplies it, so memory
stays near the file's size.
"""
from __future__ import annotations

import math

import numpy as np

from ..formats.gguf import Tensor
from ..quant import dequantize, dequantize_rows
from .base import AttentionSpec, Backend, KVCache, PassView, Rope, as_view, check_attention, check_norm, check_rope
from .kv_cache import decode_rows, encode_rows

SLAB_BYTES = 32 << 20  # float32 bytes of weight dequantized at once


class NumpyBackend(Backend):
    name = "numpy"

    def weight(self, t: Tensor) -> Tensor:
        return t

    def embed(self, w: Tensor, ids: np.ndarray) -> np.ndarray:
        return dequantize_rows(w.data, w.type, w.shape[-1], np.asarray(ids, np.int64))

    def linear(self, x: np.ndarray, w: Tensor, bias: np.ndarray | None = None) -> np.ndarray:
        n_out, n_in = w.shape
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty((x.shape[0], n_out), np.float32)
        step = max(1, SLAB_BYTES // (4 * n_in))
        for r in range(0, n_out, step):
            rows = w.data[r : r + step]
            wt = dequantize(rows, w.type, (rows.shape[0], n_in)).T
            for a, b in self.row_runs(x.shape[0]):  # each sequence's run as alone (BLAS rounds by shape)
                y[a:b, r : r + step] = x[a:b] @ wt
        if bias is not None:
            y += bias
        return y

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        check_norm(x, w, "rms_norm")
        ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
        return (x / np.sqrt(ms + eps)) * w

    def layer_norm(self, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
        check_norm(x, w, "layer_norm", optional=True), check_norm(x, b, "layer_norm", optional=True)
        mean = x.mean(axis=-1, keepdims=True)
        xc = x - mean
        y = xc / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    def rope(self, x: np.ndarray, positions: np.ndarray, rope: Rope) -> np.ndarray:
        check_rope(x, np.asarray(positions).reshape(-1), rope)
        cos, sin = rope.cos_sin(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        half = rope.n_dims // 2
        out = x.copy()
        if rope.neox:
            a, b = x[..., :half], x[..., half : rope.n_dims]
            out[..., :half] = a * cos - b * sin
            out[..., half : rope.n_dims] = a * sin + b * cos
        else:
            a, b = x[..., 0 : rope.n_dims : 2], x[..., 1 : rope.n_dims : 2]
            out[..., 0 : rope.n_dims : 2] = a * cos - b * sin
            out[..., 1 : rope.n_dims : 2] = a * sin + b * cos
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: PassView | KVCache, layer: int,
                  spec: AttentionSpec) -> np.ndarray:
        view = as_view(cache, q.shape[0])
        check_attention(q, k, v, view, layer, spec)
        keys, values = view.k[layer], view.v[layer]
        # stored rounded to the cache's types (kv_cache.py), read back as float32
        keys[view.write_rows] = encode_rows(view.type_k, k)
        values[view.write_rows] = encode_rows(view.type_v, v)
        out = np.empty((q.shape[0], q.shape[1] * view.v_dim), np.float32)
        for run, rows in zip(view.runs, view.rows_upto):  # each sequence over its own positions
            out[run.t0:run.t1] = self._attend(q[run.t0:run.t1], decode_rows(view.type_k, keys[rows], view.k_dim),
                                              decode_rows(view.type_v, values[rows], view.v_dim), run.p0, spec)
        return out

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, p0: int,
                spec: AttentionSpec) -> np.ndarray:
        """Causal attention of queries at positions p0.. over keys/values of positions 0..p0+T-1 (every
        one of them where `spec.causal` is False)."""
        n_tok, n_head, _ = q.shape
        n = p0 + n_tok
        n_kv = keys.shape[1]
        group = n_head // n_kv
        qg = q.reshape(n_tok, n_kv, group, -1)
        scores = np.einsum("tkgd,skd->kgts", qg, keys, optimize=True) * np.float32(spec.scale)
        if spec.softcap:
            scores = np.tanh(scores / spec.softcap) * np.float32(spec.softcap)
        if spec.alibi_slopes is not None:
            slopes = np.asarray(spec.alibi_slopes, np.float32).reshape(n_kv, group, 1, 1)
            scores = scores + slopes * np.arange(n, dtype=np.float32)
        q_pos = np.arange(p0, n)[:, None]
        k_pos = np.arange(n)[None, :]
        masked = k_pos > (q_pos if spec.causal else n - 1)
        if spec.window:
            masked |= k_pos <= q_pos - spec.window
        scores = np.where(masked, np.float32(-np.inf), scores)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", probs, values, optimize=True)
        return out.reshape(n_tok, -1).astype(np.float32, copy=False)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return x / (np.float32(1) + np.exp(-x))

    def gelu(self, x: np.ndarray) -> np.ndarray:
        c = np.float32(np.sqrt(2 / np.pi))
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))

    def gelu_erf(self, x: np.ndarray) -> np.ndarray:
        # float64 through math.erfc (numpy has no erf): erfc keeps x·Φ(x) accurate where Φ(x) is tiny
        x64 = np.asarray(x, np.float64)
        return (0.5 * x64 * _erfc(-x64 / math.sqrt(2.0)).astype(np.float64)).astype(np.float32)


_erfc = np.frompyfunc(math.erfc, 1, 1)
