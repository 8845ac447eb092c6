"""The op interface every backend implements, and the pieces backends share.

A model is written once against these ops; it never knows which backend runs it. Activations are the
backend's own arrays (numpy here; a torch backend would use tensors) and support `+`, `*`, `reshape`.
Weights are prepared once at load (`weight`, `vector`): a backend may keep them packed, repack them or
move them to a device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShapeError
from . import malloc
from .kv_cache import KVCache, PassView, as_view, rotate  # noqa: F401 (the interface's cache types)
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
    causal: bool = True  # False (encoders: BERT): a token attends every position of its run too


# Checks at each op's entry, shared by the backends: kernels index with these sizes unchecked
# (numba's boundscheck is off), so nothing reaches them that does not fit. A few attribute
# comparisons per call (their cost per token: benchmarks/README.md).

def check_norm(x: Any, w: Any, op: str, optional: bool = False) -> None:
    if w is None and not optional:
        raise ShapeError(f"{op}: no weight")
    if w is not None and (w.ndim != 1 or w.shape[0] != x.shape[-1]):
        raise ShapeError(f"{op}: weight of shape {w.shape} for rows of {x.shape[-1]} features")


def check_rotate(x: Any, n: int) -> None:
    if not (isinstance(n, int) and n > 0 and n & (n - 1) == 0) or x.ndim < 1 or x.shape[-1] % n:
        raise ShapeError(f"rotate: a Hadamard block of {n!r} for rows of {x.shape[-1] if x.ndim else 0} "
                         f"(a power of two that divides them)")


def check_rope(x: Any, positions: np.ndarray, rope: Rope) -> None:
    if x.ndim != 3 or len(positions) != x.shape[0]:
        raise ShapeError(f"rope: input of shape {x.shape} for {len(positions)} positions")
    if rope.n_dims % 2 or not 0 < rope.n_dims <= x.shape[2]:
        raise ShapeError(f"rope: {rope.n_dims} rotated features in heads of {x.shape[2]} (must be even, at most that)")
    if rope.freq_factors is not None and len(rope.freq_factors) != rope.n_dims // 2:
        raise ShapeError(f"rope: {len(rope.freq_factors)} frequency factors for {rope.n_dims // 2} pairs")


def check_attention(q: Any, k: Any, v: Any, view: PassView, layer: int, spec: AttentionSpec) -> None:
    n_kv = view.n_kv_heads
    if (q.ndim != 3 or q.shape[0] != view.n_tokens or k.shape != (q.shape[0], n_kv, view.k_dim)
            or v.shape != (q.shape[0], n_kv, view.v_dim) or q.shape[2] != view.k_dim):
        raise ShapeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} for a pass of {view.n_tokens} tokens "
                         f"and a cache of {n_kv} KV heads of {view.k_dim}/{view.v_dim} features")
    if q.shape[1] % n_kv:
        raise ShapeError(f"attention: {q.shape[1]} query heads cannot share {n_kv} KV heads evenly")
    if not 0 <= layer < view.n_layers:
        raise ShapeError(f"attention: layer {layer} outside the cache ({view.n_layers} layers)")
    if spec.alibi_slopes is not None and len(spec.alibi_slopes) != q.shape[1]:
        raise ShapeError(f"attention: {len(spec.alibi_slopes)} ALiBi slopes for {q.shape[1]} heads")
    if not spec.causal and (spec.window or spec.alibi_slopes is not None or spec.softcap):
        raise ShapeError("attention: a non-causal spec with a sliding window, ALiBi or a softcap (no architecture "
                         "has one)")


MIN_EXPERT_SUM = 6.103515625e-5  # llama.cpp clamps the sum of the picked weights to this (the smallest f16 normal)
GATING = ("softmax", "sigmoid")


def check_route(logits: np.ndarray, n_used: int, gating: str) -> None:
    if logits.ndim != 2 or not 1 <= n_used <= logits.shape[1]:
        raise ShapeError(f"route: {n_used} experts of router logits shaped {logits.shape}")
    if gating not in GATING:
        raise ValueError(f"gating: {gating!r}")


def expert_tensors(t: Tensor) -> list[Tensor]:
    """A (n_expert, rows, cols) tensor as one (rows, cols) tensor per expert: views of its rows, each
    with its own offset in the file (what a backend's pack cache keys on)."""
    n_expert, rows = t.shape[0], t.shape[1]
    step = rows * t.data.shape[1]  # bytes per expert
    return [dataclasses.replace(t, shape=t.shape[1:], data=t.data[e * rows:(e + 1) * rows], offset=t.offset + e * step)
            for e in range(n_expert)]


class Backend(ABC):
    """The ops a transformer needs. x is (tokens, features) unless stated."""

    name: str = "?"
    short_run: int = 1  # runs of up to this many tokens can share one call of its decode kernels

    # -- forward passes
    @contextmanager
    def forward_pass(self, segments: list[int], head_segments: list[int] | None = None) -> Iterator[None]:
        """Brackets one forward pass (Model.forward_batch opens it). `segments`: the batch's rows as
        runs of consecutive tokens of one sequence (a decode token is a run of 1), in row order;
        `head_segments`: the same for the rows whose logits are computed. A backend computes each
        run's rows as it would if the run were alone (the kernel it picks depends on the run, not
        on the batch), so a sequence's results do not depend on its company. Settings a backend
        changes for the pass (thread counts) are put back when it ends, also when an exception
        ends it. A prompt's pass runs with malloc keeping freed blocks for reuse (malloc.py)."""
        self.begin_pass(segments, head_segments or segments)
        try:
            with malloc.keep_freed if sum(segments) >= malloc.MIN_TOKENS else nullcontext():
                yield
        except BaseException:
            self.end_pass(failed=True)
            raise
        self.end_pass()

    def begin_pass(self, segments: list[int], head_segments: list[int]) -> None:
        # the pass's runs by row count: of the hidden states, and of the logits (one pass at a time)
        self.layouts = {sum(head_segments): head_segments, sum(segments): segments}

    def end_pass(self, failed: bool = False) -> None:
        self.layouts = {}

    layouts: dict[int, list[int]] = {}

    def row_runs(self, n_rows: int) -> list[tuple[int, int]]:
        """Rows a..b-1 of each run of an activation with n_rows rows in this pass; one run of all
        rows outside a pass or for a row count the pass did not announce."""
        out, a = [], 0
        for n in self.layouts.get(n_rows, (n_rows,)):
            out.append((a, a + n))
            a += n
        return out

    def run(self, compute: Any, ids: np.ndarray, view: PassView, rows: np.ndarray | None) -> Any:
        """One pass's computation, `compute(ids, positions, view, rows)` (Model.logits_of), inside
        forward_pass. A backend may run it differently with the same result: a GPU backend captures
        the decode step once and replays it (CUDA graphs)."""
        return compute(ids, view.positions, view, rows)

    # -- weights, prepared once at load
    def prepare(self, types: set[GGMLType], lookups: set[GGMLType] = frozenset(), n_weights: int = 0) -> None:
        """Called before a model whose matrices (2-D tensors) have `types` builds its weights, and
        whose embeddings (looked up row by row) have `lookups`; `n_weights`: the matrices' elements
        in all (0: unknown). A backend that compiles kernels can make them ready here."""

    @abstractmethod
    def weight(self, t: Tensor) -> Any:
        """A matrix for `linear`/`embed`, from its packed GGUF tensor."""

    def weights(self, ts: list[Tensor]) -> Any:
        """Matrices that always multiply the same input (q|k|v, gate|up), for `linear_many`. A backend
        may merge them into one matrix so that one pass over x serves all."""
        return [self.weight(t) for t in ts]

    # -- mixture of experts (models/experts.py)
    def experts(self, gate: Tensor, up: Tensor, down: Tensor) -> tuple[list[Any], list[Any]]:
        """A layer's experts from its 3-D tensors (n_expert, rows, cols): each expert's gate|up pair
        (for `glu`) and its down matrix (for `linear`), made from views of its rows."""
        pairs = zip(expert_tensors(gate), expert_tensors(up))
        return [self.expert_weights([g, u]) for g, u in pairs], [self.expert_weights([d]) for d in expert_tensors(down)]

    def route(self, logits: np.ndarray, n_used: int, gating: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """Each token's picked experts (tokens, n_used), best first, and their float32 weights, from its
        router logits (tokens, n_expert), as llama.cpp's build_moe_ffn: p = softmax (or sigmoid) of the
        logits, the n_used largest p (equal ones: the lower expert first), divided by their sum (at least
        MIN_EXPERT_SUM) where `normalize`. Numpy arrays in and out; a token's result is its own alone."""
        logits = np.asarray(logits, np.float32)
        check_route(logits, n_used, gating)
        if gating == "softmax":
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
        else:
            with np.errstate(over="ignore"):  # exp(-x) = inf: p = 0
                p = np.float32(1) / (np.float32(1) + np.exp(-logits))
        top = np.argsort(-p, axis=1, kind="stable")[:, :n_used]
        w = np.take_along_axis(p, top, axis=1)
        if normalize:
            w /= np.maximum(w.sum(axis=1, keepdims=True), np.float32(MIN_EXPERT_SUM))
        return top, w.astype(np.float32, copy=False)

    def expert_ffn(self, x: Any, gate_up: list[Any], down: list[Any], picks: np.ndarray, weights: np.ndarray,
                   act: str) -> Any:
        """One token's (x: (1, dim)) mixture Σ_k weights[k] · down[e](glu(x, gate_up[e])), e = picks[k]
        ascending, added in that order (as mix_rows adds a token's experts: the same bits)."""
        out = None
        for e, w in zip(picks, weights):
            y = self.linear(self.glu(x, gate_up[e], act), down[e]) * float(w)
            out = y if out is None else out + y
        return out

    def expert_weights(self, ts: list[Tensor]) -> Any:
        """One expert's matrices, views of its rows in the file: a pair [gate, up] as `weights` makes it
        (for `glu`), one tensor as `weight` does. Most experts of a run may never be picked, so a
        backend that repacks should do it on first use, not here."""
        return self.weights(ts) if len(ts) > 1 else self.weight(ts[0])

    @contextmanager
    def gathered(self, n_rows: int, rows: np.ndarray) -> Iterator[None]:
        """Ops inside work on `rows` (sorted) of the pass's n_rows activation rows, gathered: each
        keeps the run it came from (a decode token stays a run of its own), so that each run's rows
        are computed as they would be with the run alone (an expert's tokens, models/experts.py)."""
        if len(rows) == n_rows:
            yield
            return
        starts = [a for a, _ in self.row_runs(n_rows)]
        counts = np.diff(np.searchsorted(rows, starts + [n_rows]))
        saved = self.layouts
        self.layouts = {**saved, len(rows): [int(c) for c in counts if c]}
        try:
            yield
        finally:
            self.layouts = saved

    def mix_rows(self, n_rows: int, parts: list[tuple[np.ndarray, Any, np.ndarray]]) -> Any:
        """Σ w[:, None] * y placed at rows `rows`, over parts (rows, y, w), in a (n_rows, width) array
        of zeros: the experts' outputs mixed per token by their router weights (w: float32, numpy).
        Parts are added in order, so a token's sum does not depend on the other tokens."""
        out = np.zeros((n_rows, parts[0][1].shape[1]), np.float32)
        for rows, y, w in parts:
            out[rows] += np.asarray(y, np.float32) * w[:, None]
        return out

    def vector(self, t: Tensor) -> Any:
        """A small float tensor (norm weight, bias) as float32."""
        return t.dequantize()

    def kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int,
                 type_k: str = "f32", type_v: str = "f32") -> KVCache:
        """An empty cache; `type_k`, `type_v`: its stores' types (kv_cache.CACHE_TYPES)."""
        return KVCache(n_layers, n_ctx, n_kv_heads, k_dim, v_dim, type_k=type_k, type_v=type_v)

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
    def attention(self, q: Any, k: Any, v: Any, cache: PassView | KVCache, layer: int, spec: AttentionSpec) -> Any:
        """Store k, v (tokens, kv_heads, dim) in the cache at each token's sequence and position (a
        PassView says where; a bare KVCache means its sequence 0 at n_past..), then causal attention
        of each token's q (tokens, heads, dim) over its own sequence's positions up to its own (with
        `spec.causal` False: up to its run's last one). Returns (tokens, heads * v_dim)."""

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

    def lora_weights(self, a: Tensor, b: Tensor) -> Any:
        """A LoRA adapter's halves, A (rank, in) and B (out, rank), for `lora` (purelm.lora), as a pair
        (A's form, B's form): here float32 A and Bᵀ. The parts of a fused matrix share A's form."""
        return a.dequantize(), np.ascontiguousarray(b.dequantize().T)

    def lora(self, x: Any, y: Any, ab: Any, factor: float) -> Any:
        """y + factor · (x·Aᵀ)·Bᵀ for `ab` from lora_weights: x (tokens, in), y (tokens, out); each run
        of the pass alone (forward_pass)."""
        a, bt = ab
        if x.ndim != 2 or x.shape[1] != a.shape[1] or y.shape != (x.shape[0], bt.shape[1]):
            raise ShapeError(f"lora: x {x.shape} and y {y.shape} do not fit A {a.shape} and B {bt.shape[::-1]}")
        out = np.empty(y.shape, np.float32)
        for r0, r1 in self.row_runs(x.shape[0]):
            t = x[r0:r1] @ a.T
            t *= np.float32(factor)
            np.add(y[r0:r1], t @ bt, out=out[r0:r1])
        return out

    def softcap(self, x: Any, cap: float) -> Any:
        """cap * tanh(x / cap) (gemma2's final logits)."""
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def rotate(self, x: Any, n: int) -> Any:
        """x (..., dim) with each run of n values multiplied by the orthonormal Hadamard matrix of
        size n: how a quantized KV cache stores keys and values (kv_cache.py, "Rotation")."""
        check_rotate(x, n)
        return rotate(x, n)

    def clamp(self, x: Any, lo: float, hi: float) -> Any:
        """min(max(x, lo), hi) elementwise (MPT's clip_qkv, ggml_clamp)."""
        return np.clip(x, np.float32(lo), np.float32(hi))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x, np.float32)

    @abstractmethod
    def gelu_erf(self, x: Any) -> Any:
        """Exact GELU, x·Φ(x) = 0.5·x·erfc(-x/√2): the `gelu` of Falcon, GPT-NeoX and MPT checkpoints
        (`gelu` is the tanh form the others were trained with)."""
