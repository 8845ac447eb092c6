"""The layers every architecture is built from, each written once: norms, attention, the gated and the
plain feed-forward, the output head. Each layer is a dataclass of its weights, read from the GGUF file by
llama.cpp's tensor names (shapes checked against the model's sizes), with a __call__ that applies it
through the backend's ops. Architecture files pick the pieces and write how they connect."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache, Rope
from .common import Model, Weights


def bias_vector(w: Weights, name: str, n: int, bias: str) -> Any:
    """A layer's bias as `bias` says the file has it: "required", "optional", or "none" (never read:
    the architecture has none)."""
    if bias not in ("required", "optional", "none"):
        raise ValueError(f"bias: {bias!r}")
    return None if bias == "none" else w.vector(name, n, optional=bias == "optional")


def add_bias(x: Any, bias: Any) -> Any:
    """x + bias, or x when the (optional) bias is absent."""
    return x if bias is None else x + bias


def split_matrix(w: Weights, name: str, rows: list[int], n_in: int) -> Any:
    """A fused matrix (q|k|v, gate|up) as its parts, each a view of its rows in the file, prepared as
    `Weights.matrices` prepares separate ones: a fused file and a split one run the same code."""
    t = w.tensor(name, (sum(rows), n_in))
    parts, start = [], 0
    for n in rows:
        parts.append(dataclasses.replace(t, shape=(n, n_in), data=t.data[start:start + n],
                                         offset=t.offset + start * t.data.shape[1]))
        start += n
    return w.backend.weights(parts)


@dataclass
class Norm:
    """RMSNorm(x) = x / sqrt(mean(x²) + eps) · w, or LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) · w + b
    (LayerNorm's weight and bias each optional), over the last axis."""

    ops: Backend
    rms: bool
    eps: float
    weight: Any = None
    bias: Any = None

    def __call__(self, x: Any) -> Any:
        if self.rms:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    @classmethod
    def rms_norm(cls, m: Model, w: Weights, name: str, optional: bool = False) -> Norm | None:
        """`name`.weight over the model's width; None when optional and absent."""
        weight = w.vector(name + ".weight", m.dim, optional)
        return None if weight is None else cls(m.ops, True, m.eps, weight)

    @classmethod
    def layer_norm(cls, m: Model, w: Weights, name: str, bias: str = "required", optional: bool = False) -> Norm | None:
        weight = w.vector(name + ".weight", m.dim, optional)
        if weight is None:
            return None
        return cls(m.ops, False, m.eps, weight, bias_vector(w, name + ".bias", m.dim, bias))


@dataclass
class HeadNorm:
    """A norm of each head of q or k (tokens, heads, head_dim) over head_dim: Gemma 3's RMSNorm with one
    weight for all heads, or StableLM 2's LayerNorm scaled by a weight per head (`per_head`)."""

    norm: Norm
    per_head: Any = None  # (heads, head_dim)

    def __call__(self, x: Any) -> Any:
        T, H, D = x.shape
        y = self.norm(x.reshape(T * H, D)).reshape(T, H, D)
        return y if self.per_head is None else y * self.per_head

    @classmethod
    def rms_norm(cls, m: Model, w: Weights, name: str, optional: bool) -> HeadNorm | None:
        weight = w.vector(name, m.head_dim, optional)
        return None if weight is None else cls(Norm(m.ops, True, m.eps, weight))

    @classmethod
    def layer_norm_per_head(cls, m: Model, w: Weights, name: str, n_head: int) -> HeadNorm | None:
        """Optional: None when the file has no `name`."""
        t = w.tensor(name, (n_head, m.head_dim), optional=True)
        return None if t is None else cls(Norm(m.ops, False, m.eps), m.ops.vector(t).reshape(n_head, m.head_dim))


@dataclass
class ProjectionNorm:
    """An RMSNorm of q or k (tokens, heads, head_dim) over all its heads at once: OLMo 2's and OLMoE's,
    on the whole projection before it splits into heads."""

    norm: Norm

    def __call__(self, x: Any) -> Any:
        T, H, D = x.shape
        return self.norm(x.reshape(T, H * D)).reshape(T, H, D)

    @classmethod
    def load(cls, m: Model, w: Weights, name: str, n_head: int) -> ProjectionNorm:
        return cls(Norm(m.ops, True, m.eps, w.vector(name, n_head * m.head_dim)))


@dataclass
class Attention:
    """Causal self-attention with grouped KV heads (as many as the query heads: multi-head; one: multi-query):

        q, k, v = Wq·x + bq,  Wk·x + bk,  Wv·x + bv
        out     = Wo · Attention(rope(N_q(q)), rope(N_k(k)), v) + bo

    Wq, Wk, Wv multiply x in one call (`wqkv`), whether the file fuses them (attn_qkv) or not. Each bias,
    the per-head norms N_q, N_k and the rope are optional; `clamp` (MPT) clips q, k and v to ±clamp."""

    ops: Backend
    layer: int  # this layer's index: where its keys and values go in the cache
    n_head: int
    n_kv_head: int
    head_dim: int
    wqkv: Any
    wo: Any
    spec: AttentionSpec
    rope: Rope | None = None
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None
    q_norm: HeadNorm | None = None
    k_norm: HeadNorm | None = None
    clamp: float | None = None

    def __call__(self, x: Any, positions: Any, cache: KVCache, rope: Rope | None = None) -> Any:
        """`rope`: this pass's rotary embedding, where it is not always the layer's own (Phi-3)."""
        ops, hd, rope = self.ops, self.head_dim, rope or self.rope
        q, k, v = ops.linear_many(x, self.wqkv)
        q, k, v = add_bias(q, self.bq), add_bias(k, self.bk), add_bias(v, self.bv)
        if self.clamp is not None:
            q, k, v = (ops.clamp(y, -self.clamp, self.clamp) for y in (q, k, v))
        q, k, v = q.reshape(-1, self.n_head, hd), k.reshape(-1, self.n_kv_head, hd), v.reshape(-1, self.n_kv_head, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:
            q, k = ops.rope(q, positions, rope), ops.rope(k, positions, rope)
        if cache.rotate_k:  # a quantized cache holds H·k and H·v (kv_cache.py: Rotation); (Hq)·(Hk) = q·k
            q, k = ops.rotate(q, cache.rotate_k), ops.rotate(k, cache.rotate_k)
        if cache.rotate_v:
            v = ops.rotate(v, cache.rotate_v)
        out = ops.attention(q, k, v, cache, self.layer, self.spec)
        if cache.rotate_v:  # a sum of rotated values, turned back (H·H = I)
            out = ops.rotate(out, cache.rotate_v)
        return ops.linear(out, self.wo, self.bo)

    @classmethod
    def load(cls, m: Model, w: Weights, i: int, rope: Rope | None = None, spec: AttentionSpec | None = None,
             fused: bool = False, bias: str = "optional", out_bias: str = "none", **options: Any) -> Attention:
        """Layer i's attn_q, attn_k, attn_v (or, `fused`, attn_qkv: all q rows, then k, then v) with biases
        as `bias` says, and attn_output with its bias as `out_bias` says. `spec`: plain causal attention
        scaled by 1/sqrt(head_dim) when not given. `options`: the norms, clamp."""
        b, dim, hd = f"blk.{i}.", m.dim, m.head_dim
        spec = spec or AttentionSpec(scale=1.0 / math.sqrt(hd))
        sizes = [m.n_head * hd, m.n_kv_head * hd, m.n_kv_head * hd]
        if fused:
            wqkv = split_matrix(w, b + "attn_qkv.weight", sizes, dim)
            bqkv = bias_vector(w, b + "attn_qkv.bias", sum(sizes), bias)
            ends = np.cumsum(sizes)
            biases = [None] * 3 if bqkv is None else [bqkv[e - n:e] for n, e in zip(sizes, ends)]
        else:
            wqkv = w.matrices([(f"{b}attn_{p}.weight", (n, dim)) for p, n in zip("qkv", sizes)])
            biases = [bias_vector(w, f"{b}attn_{p}.bias", n, bias) for p, n in zip("qkv", sizes)]
        wo = w.matrix(b + "attn_output.weight", (dim, sizes[0]))
        bo = bias_vector(w, b + "attn_output.bias", dim, out_bias)
        return cls(m.ops, i, m.n_head, m.n_kv_head, hd, wqkv, wo, spec, rope, *biases, bo, **options)


@dataclass
class GatedFFN:
    """Wdown · (act(Wgate·x) * Wup·x), act silu (SwiGLU) or tanh GELU (GeGLU): gate and up are one pair
    for `ops.glu`, which may fuse their products with the activation."""

    ops: Backend
    gate_up: Any
    down: Any
    act: str  # "silu" or "gelu"

    def __call__(self, x: Any) -> Any:
        return self.ops.linear(self.ops.glu(x, self.gate_up, self.act), self.down)

    @classmethod
    def load(cls, m: Model, w: Weights, i: int, n_ff: int, act: str, fused: bool = False) -> GatedFFN:
        """Layer i's ffn_gate and ffn_up (or, `fused`, ffn_up holding gate then up: Phi-3) and ffn_down."""
        b, dim = f"blk.{i}.", m.dim
        if fused:
            gate_up = split_matrix(w, b + "ffn_up.weight", [n_ff, n_ff], dim)
        else:
            gate_up = w.matrices([(b + "ffn_gate.weight", (n_ff, dim)), (b + "ffn_up.weight", (n_ff, dim))])
        return cls(m.ops, gate_up, w.matrix(b + "ffn_down.weight", (dim, n_ff)), act)


@dataclass
class MLP:
    """Wdown · act(Wup·x + bup) + bdown, act "gelu" (the tanh form) or "gelu_erf" (exact)."""

    ops: Backend
    act: str
    up: Any
    b_up: Any  # None where absent, as b_down
    down: Any
    b_down: Any

    def __call__(self, x: Any) -> Any:
        h = self.ops.linear(x, self.up, self.b_up)
        return self.ops.linear(getattr(self.ops, self.act)(h), self.down, self.b_down)

    @classmethod
    def load(cls, m: Model, w: Weights, i: int, n_ff: int, act: str, bias: str = "optional") -> MLP:
        b, dim = f"blk.{i}.", m.dim
        up, b_up = w.matrix(b + "ffn_up.weight", (n_ff, dim)), bias_vector(w, b + "ffn_up.bias", n_ff, bias)
        down, b_down = w.matrix(b + "ffn_down.weight", (dim, n_ff)), bias_vector(w, b + "ffn_down.bias", dim, bias)
        return cls(m.ops, act, up, b_up, down, b_down)


@dataclass
class Block:
    """One decoder layer's parts; the architecture's `hidden` writes how they connect."""

    attn_norm: Norm
    attn: Attention
    ffn: GatedFFN | MLP
    ffn_norm: Norm | None = None  # None: the feed-forward reads attn_norm's output (parallel blocks)
    post_attn_norm: Norm | None = None  # Gemma 2/3: norms of the sublayers' outputs
    post_ffn_norm: Norm | None = None


def output_head(m: Model, w: Weights, tied: bool = True, bias: str = "none") -> tuple[Any, Any]:
    """The output matrix and its bias, for `Model.head`. `tied`: a file without output.weight uses the
    token embedding (m.tok_embd) instead."""
    out = w.matrix("output.weight", (m.n_vocab, m.dim), optional=tied)
    return (m.tok_embd if out is None else out), bias_vector(w, "output.bias", m.n_vocab, bias)


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
