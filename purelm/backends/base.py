"""The op interface every backend implements, and the pieces backends share.

A model is written once against these ops; it never knows which backend runs it. Activations are the
backend's own arrays (numpy here; a torch backend would use tensors) and support `+`, `*`, `reshape`.
Weights are prepared once at load (`weight`, `vector`): a backend may keep them packed, repack them or
move them to a device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShapeError
from ..formats.gguf import Tensor
from ..quant.types import GGMLType


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding as llama.cpp applies it.

    `neox=False` rotates adjacent pairs (x[2i], x[2i+1]) (GGUF's permuted LLaMA q/k layout);
    `neox=True` rotates x[i] with x[i + n_dims/2]. Only the first `n_dims` features rotate."""

    n_dims: int
    base: float = 10000.0
    neox: bool = False
    freq_scale: float = 1.0  # linear scaling: positions are multiplied by this
    freq_factors: tuple[float, ...] | None = None  # per-pair divisors (llama3-style rope_freqs)
    attn_factor: float = 1.0  # cos and sin are multiplied by this (ggml_rope_ext's attn_factor; longrope)

    def inv_freq(self) -> np.ndarray:
        inv = self.base ** (-np.arange(0, self.n_dims, 2, dtype=np.float64) / self.n_dims)
        if self.freq_factors is not None:
            inv = inv / np.asarray(self.freq_factors, np.float64)
        return inv

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of shape (T, n_dims/2), float32."""
        theta = (np.asarray(positions, np.float64) * self.freq_scale)[:, None] * self.inv_freq()[None, :]
        return ((np.cos(theta) * self.attn_factor).astype(np.float32),
                (np.sin(theta) * self.attn_factor).astype(np.float32))


@dataclass
class AttentionSpec:
    """What varies between architectures' attention; the defaults are plain causal softmax attention."""

    scale: float
    softcap: float | None = None  # gemma2: logits = softcap * tanh(logits / softcap)
    window: int | None = None  # sliding window: attend only the last `window` positions
    alibi_slopes: np.ndarray | None = None  # per query head (bloom, mpt)


class KVCache:
    """Keys and values of every layer, grown on demand up to `n_ctx` positions.

    Layer i holds k[i], v[i] of shape (capacity, n_kv_heads, head_dim). `n_past` counts the positions
    already stored; `commit(n)` moves it on after a forward pass of n tokens."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int,
                 dtype: Any = np.float32) -> None:
        self.n_layers, self.n_ctx, self.n_kv_heads = n_layers, n_ctx, n_kv_heads
        self.k_dim, self.v_dim, self.dtype = k_dim, v_dim, dtype
        self.n_past = 0
        self.tokens: list[int] = []  # the ids at positions 0..n_past-1, when the caller tracks them
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def reserve(self, n_positions: int) -> None:
        if n_positions <= self.capacity:
            return
        cap = min(self.n_ctx, max(n_positions, 2 * self.capacity, 256))
        for i in range(self.n_layers):
            for store, dim in ((self.k, self.k_dim), (self.v, self.v_dim)):
                new = np.zeros((cap, self.n_kv_heads, dim), self.dtype)
                if store[i:]:
                    new[: self.capacity] = store[i][: self.capacity]
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = cap

    def commit(self, n_tokens: int) -> None:
        self.n_past += n_tokens

    def truncate(self, n_past: int) -> None:
        """Forget positions from n_past on (to reuse a shared prompt prefix)."""
        self.n_past = min(self.n_past, n_past)
        del self.tokens[self.n_past :]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


# Checks at each op's entry, shared by the backends: kernels index with these sizes unchecked
# (numba's boundscheck is off), so nothing reaches them that does not fit. A few attribute
# comparisons per call: see benchmarks/README.md for their cost per token.

def check_norm(x: Any, w: Any, op: str, optional: bool = False) -> None:
    if w is None and not optional:
        raise ShapeError(f"{op}: no weight")
    if w is not None and (w.ndim != 1 or w.shape[0] != x.shape[-1]):
        raise ShapeError(f"{op}: weight of shape {w.shape} for rows of {x.shape[-1]} features")


def check_rope(x: Any, positions: np.ndarray, rope: Rope) -> None:
    if x.ndim != 3 or len(positions) != x.shape[0]:
        raise ShapeError(f"rope: input of shape {x.shape} for {len(positions)} positions")
    if rope.n_dims % 2 or not 0 < rope.n_dims <= x.shape[2]:
        raise ShapeError(f"rope: {rope.n_dims} rotated features in heads of {x.shape[2]} (must be even, at most that)")
    if rope.freq_factors is not None and len(rope.freq_factors) != rope.n_dims // 2:
        raise ShapeError(f"rope: {len(rope.freq_factors)} frequency factors for {rope.n_dims // 2} pairs")


def check_attention(q: Any, k: Any, v: Any, cache: KVCache, layer: int, spec: AttentionSpec) -> None:
    n_kv = cache.n_kv_heads
    if (q.ndim != 3 or k.shape != (q.shape[0], n_kv, cache.k_dim) or v.shape != (q.shape[0], n_kv, cache.v_dim)
            or q.shape[2] != cache.k_dim):
        raise ShapeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} for a cache of {n_kv} KV heads "
                         f"of {cache.k_dim}/{cache.v_dim} features")
    if q.shape[1] % n_kv:
        raise ShapeError(f"attention: {q.shape[1]} query heads cannot share {n_kv} KV heads evenly")
    if not 0 <= layer < cache.n_layers or cache.n_past + q.shape[0] > cache.n_ctx:
        raise ShapeError(f"attention: layer {layer} at positions {cache.n_past}+{q.shape[0]} outside the cache "
                         f"({cache.n_layers} layers, {cache.n_ctx} positions)")
    if spec.alibi_slopes is not None and len(spec.alibi_slopes) != q.shape[1]:
        raise ShapeError(f"attention: {len(spec.alibi_slopes)} ALiBi slopes for {q.shape[1]} heads")


class Backend(ABC):
    """The ops a transformer needs. x is (tokens, features) unless stated."""

    name: str = "?"

    # -- weights, prepared once at load
    def prepare(self, types: set[GGMLType]) -> None:
        """Called before a model whose matrices (2-D tensors) have `types` builds its weights: a
        backend that compiles kernels can make them ready here."""

    @abstractmethod
    def weight(self, t: Tensor) -> Any:
        """A matrix for `linear`/`embed`, from its packed GGUF tensor."""

    def weights(self, ts: list[Tensor]) -> Any:
        """Matrices that always multiply the same input (q|k|v, gate|up), for `linear_many`. A backend
        may merge them into one matrix so that one pass over x serves all."""
        return [self.weight(t) for t in ts]

    def vector(self, t: Tensor) -> Any:
        """A small float tensor (norm weight, bias) as float32."""
        return t.dequantize()

    def kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int) -> KVCache:
        return KVCache(n_layers, n_ctx, n_kv_heads, k_dim, v_dim)

    # -- ops
    @abstractmethod
    def embed(self, w: Any, ids: np.ndarray) -> Any: ...

    @abstractmethod
    def linear(self, x: Any, w: Any, bias: Any = None) -> Any:
        """x @ w.T (+ bias), for w of shape (out, in)."""

    def linear_many(self, x: Any, ws: Any) -> list[Any]:
        """[x @ w.T for w in ws], for `ws` from `weights`."""
        return [self.linear(x, w) for w in ws]

    @abstractmethod
    def rms_norm(self, x: Any, w: Any, eps: float) -> Any: ...

    @abstractmethod
    def layer_norm(self, x: Any, w: Any, b: Any, eps: float) -> Any: ...

    @abstractmethod
    def rope(self, x: Any, positions: np.ndarray, rope: Rope) -> Any:
        """x: (tokens, heads, head_dim)."""

    @abstractmethod
    def attention(self, q: Any, k: Any, v: Any, cache: KVCache, layer: int, spec: AttentionSpec) -> Any:
        """Store k, v (tokens, kv_heads, dim) at positions cache.n_past.., then causal attention of q
        (tokens, heads, dim) over everything cached. Returns (tokens, heads * v_dim)."""

    @abstractmethod
    def silu(self, x: Any) -> Any: ...

    @abstractmethod
    def gelu(self, x: Any) -> Any:
        """tanh-approximated GELU (ggml's gelu)."""

    def swiglu(self, gate: Any, up: Any) -> Any:
        return self.silu(gate) * up

    def geglu(self, gate: Any, up: Any) -> Any:
        return self.gelu(gate) * up

    def glu(self, x: Any, w_gate_up: Any, act: str) -> Any:
        """act(x·Wgateᵀ) * (x·Wupᵀ) for the pair `weights([gate, up])` made, act "silu" (SwiGLU) or
        "gelu" (GeGLU): a gated feed-forward's first half. A backend may fuse it so that the
        full-width gate and up products never exist at once (a long prompt's largest temporaries)."""
        gate, up = self.linear_many(x, w_gate_up)
        return self.swiglu(gate, up) if act == "silu" else self.geglu(gate, up)

    def softcap(self, x: Any, cap: float) -> Any:
        """cap * tanh(x / cap) (gemma2's final logits)."""
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def clamp(self, x: Any, lo: float, hi: float) -> Any:
        """min(max(x, lo), hi) elementwise (MPT's clip_qkv, ggml_clamp)."""
        return np.clip(x, np.float32(lo), np.float32(hi))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x, np.float32)
