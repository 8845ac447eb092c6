"""What every model file shares: reading hyperparameters and weights from a GGUF file with clear errors,
and the forward-pass bookkeeping around the KV cache."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends.base import Backend, KVCache, Rope
from ..errors import ContextOverflowError, FormatError, UsageError
from ..formats.gguf import GGUFFile, Tensor, ValueType


INT_LIMIT = 2**31 - 1  # no count or size in a model file may exceed this (llama.cpp reads them as int32)
_MISSING = object()


class Params:
    """`{arch}.*` hyperparameters, each read with its type and range checked: a value that is missing,
    of the wrong type or out of range is a `FormatError` naming the key, the value and what it must be.
    Nothing read here has been used yet, so a lie stops before any allocation or kernel."""

    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf, self.arch = gguf, gguf.architecture

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.gguf.metadata

    def fail(self, name: str, value: Any, must: str) -> FormatError:
        shown = f"an array of {len(value)}" if isinstance(value, (np.ndarray, list)) else repr(value)
        if len(shown) > 60:
            shown = shown[:60] + "..."
        return FormatError(self.gguf.path, self.key(name), f"is {shown}; it must be {must}")

    def raw(self, name: str) -> Any:
        if not self.has(name):
            raise FormatError(self.gguf.path, self.key(name), "required metadata key is missing")
        return self.gguf.metadata[self.key(name)]

    def int(self, name: str, default: Any = _MISSING, lo: int = 1, hi: int = INT_LIMIT) -> Any:
        """An integer in [lo, hi]; `default` (as given) when the key is absent and a default is given."""
        if default is not _MISSING and not self.has(name):
            return default
        value = self.raw(name)
        if not _is_int(value) or not lo <= value <= hi:
            raise self.fail(name, value, f"an integer in [{lo}, {hi}]")
        return int(value)

    def float(self, name: str, default: Any = _MISSING, lo: float = -math.inf, hi: float = math.inf,
              above: bool = False) -> Any:
        """A finite number in [lo, hi], or in (lo, hi] when `above`; integers count as numbers."""
        if default is not _MISSING and not self.has(name):
            return default
        value = self.raw(name)
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if ok:
            value = float(value)
            ok = math.isfinite(value) and lo <= value <= hi and not (above and value == lo)
        if not ok:
            raise self.fail(name, value, f"a finite number in {'(' if above else '['}{lo}, {hi}]")
        return value

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        if default is not _MISSING and not self.has(name):
            return default
        value = self.raw(name)
        if not isinstance(value, (bool, np.bool_)):
            raise self.fail(name, value, "a bool")
        return bool(value)

    def str(self, name: str, default: Any = _MISSING) -> Any:
        if default is not _MISSING and not self.has(name):
            return default
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.fail(name, value, "a string")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class Weights:
    """Fetches tensors by GGUF name, checks their shapes, and hands them to the backend."""

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf, self.backend = gguf, backend

    def tensor(self, name: str, shape: tuple[int, ...], optional: bool = False) -> Tensor | None:
        """The tensor `name`, which must have `shape`; leading dimensions of 1 are allowed, as ggml
        pads every shape with them."""
        t = self.gguf.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise FormatError(self.gguf.path, f"tensor {name!r}", f"is missing (expected shape {shape})")
        got = tuple(t.shape)
        while len(got) > len(shape) and got[0] == 1:
            got = got[1:]
        if got != tuple(shape):
            raise FormatError(self.gguf.path, f"tensor {name!r}", f"has shape {t.shape}, expected {tuple(shape)}")
        if got != t.shape:  # every backend sees the shape it was asked for
            t = dataclasses.replace(t, shape=got, data=t.data.reshape(int(np.prod(got[:-1], dtype=np.int64)), -1))
        return t

    def matrix(self, name: str, shape: tuple[int, int], optional: bool = False) -> Any:
        t = self.tensor(name, shape, optional)
        return None if t is None else self.backend.weight(t)

    def matrices(self, specs: list[tuple[str, tuple[int, int]]]) -> Any:
        """Several matrices applied to the same input, for `ops.linear_many`."""
        return self.backend.weights([self.tensor(name, shape) for name, shape in specs])

    def vector(self, name: str, n: int, optional: bool = False) -> Any:
        t = self.tensor(name, (n,), optional)
        return None if t is None else self.backend.vector(t).reshape(n)

    def floats(self, name: str, n: int, optional: bool = False) -> tuple[float, ...] | None:
        """A small tensor of n positive finite numbers read into Python (rope frequency factors)."""
        t = self.tensor(name, (n,), optional)
        if t is None:
            return None
        values = t.dequantize().reshape(-1)
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise FormatError(self.gguf.path, f"tensor {name!r}", "must hold positive finite numbers")
        return tuple(values.tolist())


class Model:
    """Base of every architecture: a forward pass over a KV cache, returning logits."""

    n_ctx_train: int
    n_vocab: int
    causal = True  # False: an encoder (BERT), whose hidden states are pooled into embeddings; no logits

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf, self.ops = gguf, backend

    def read_sizes(self, p: Params, rms_norm: bool, n_ctx_default: int = 2048,
                   n_kv_head_default: int | None = None) -> None:
        """The sizes every decoder has: layers, width, heads, kv heads, head size, norm epsilon,
        training context and vocabulary (from the embedding's rows when the key is absent), each
        checked alone and against the others. Tensor shapes are checked against them as they load."""
        n_tensors = len(self.gguf.tensors)
        self.n_layer = p.int("block_count", hi=max(1, n_tensors))  # every layer has tensors
        self.dim = p.int("embedding_length")
        self.n_head = p.int("attention.head_count")
        kv_default = min(n_kv_head_default or self.n_head, self.n_head)
        self.n_kv_head = p.int("attention.head_count_kv", kv_default, hi=self.n_head)
        if self.n_head % self.n_kv_head:
            raise p.fail("attention.head_count_kv", self.n_kv_head,
                         f"a divisor of attention.head_count ({self.n_head}): each KV head serves whole query heads")
        if not p.has("attention.key_length") and self.dim % self.n_head:
            raise p.fail("attention.head_count", self.n_head,
                         f"a divisor of embedding_length ({self.dim}) when attention.key_length is absent")
        self.head_dim = p.int("attention.key_length", self.dim // self.n_head)
        eps_key = "attention.layer_norm_rms_epsilon" if rms_norm else "attention.layer_norm_epsilon"
        self.eps = p.float(eps_key, 1e-5, lo=0.0, hi=1.0)
        self.n_ctx_train = p.int("context_length", n_ctx_default)
        embd = self.gguf.tensors.get("token_embd.weight")
        self.n_vocab = embd.shape[0] if embd is not None else p.int("vocab_size")
        tokens, meta = "tokenizer.ggml.tokens", self.gguf.metadata
        if tokens in meta and meta.types[tokens] != ValueType.ARRAY:
            raise FormatError(self.gguf.path, tokens, f"is a {meta.types[tokens].name.lower()}, not an array of strings")
        if tokens in meta and meta.array_length(tokens) > self.n_vocab:
            raise FormatError(self.gguf.path, tokens, f"has {self.gguf.metadata.array_length(tokens)} tokens but "
                              f"the model has {self.n_vocab} embedding rows: ids past them have no embedding")

    def read_rope(self, p: Params, neox: bool, n_dims_default: int | None = None, scaling: bool = True,
                  base_default: float = 10000.0, base_key: str = "rope.freq_base",
                  freq_factors: str | None = None, **extra: Any) -> Rope:
        """The rotary embedding's settings: rope.dimension_count (even, at most the head size: the
        kernels rotate pairs within a head), rope.freq_base (positive), linear scaling, and per-pair
        frequency factors from the tensor `freq_factors` if the file has it."""
        n_dims = p.int("rope.dimension_count", n_dims_default or self.head_dim, lo=0)
        if n_dims % 2 or not 2 <= n_dims <= self.head_dim:
            raise p.fail("rope.dimension_count", n_dims, f"even, in [2, {self.head_dim}]: the head size "
                         f"({'attention.key_length' if p.has('attention.key_length') else 'embedding_length / head_count'})")
        freq_scale = 1.0
        if scaling and p.str("rope.scaling.type", "none") == "linear":
            factor = p.float("rope.scaling.factor", 1.0, lo=0.0, above=False) or 1.0  # 0: not set
            freq_scale = 1.0 / factor
        factors = Weights(self.gguf, self.ops).floats(freq_factors, n_dims // 2, optional=True) \
            if freq_factors else None
        return Rope(n_dims=n_dims, base=p.float(base_key, base_default, lo=0.0, above=True), neox=neox,
                    freq_scale=freq_scale, freq_factors=factors, **extra)

    # the KV cache's store types (kv_cache.CACHE_TYPES), for every cache new_cache makes
    cache_type_k: str = "f32"
    cache_type_v: str = "f32"

    def new_cache(self, n_ctx: int) -> KVCache:
        """An empty KV cache for up to n_ctx positions: keys and values of head_dim per KV head, stored
        as cache_type_k / cache_type_v."""
        return self.ops.kv_cache(self.n_layer, n_ctx, self.n_kv_head, self.head_dim, self.head_dim,
                                 self.cache_type_k, self.cache_type_v)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `ids` (1-D) as the cache's sequence 0 at its next positions; return float32 logits for
        the last token (shape (vocab,)) or for every token (shape (len(ids), vocab))."""
        return self.forward_batch(cache, [(0, ids)], all_logits)[0]

    def forward_batch(self, cache: KVCache, requests: Sequence[tuple[int, Any]],
                      all_logits: bool | Sequence[bool] = False) -> list[np.ndarray]:
        """One forward pass over several sequences of `cache`: `requests` are (sequence id, token ids),
        each sequence's ids at its next positions (a prompt chunk, or one decode token). Returns, per
        request, float32 logits of its last token (vocab,) or of all its tokens (n, vocab) where
        `all_logits` (one bool, or one per request) says so. The backend computes each run as it would
        alone (see Backend.forward_pass)."""
        if not self.causal:
            raise UsageError(f"{self.gguf.architecture} is an embedding model: it computes embeddings (purelm "
                             "embed, LLM.embed, the server's /v1/embeddings), not next-token logits")
        if not requests:
            return []
        wants = [bool(all_logits)] * len(requests) if isinstance(all_logits, (bool, np.bool_)) else list(all_logits)
        if len(wants) != len(requests):
            raise UsageError(f"all_logits has {len(wants)} entries for {len(requests)} requests")
        ids = [self._token_ids(r[1]) for r in requests]
        # row order: decode tokens, short prompt chunks, long ones (stable), so that the backend can
        # serve the short runs together (Backend.short_run)
        order = sorted(range(len(requests)), key=lambda i: (len(ids[i]) > 1, len(ids[i]) > self.ops.short_run))
        view = cache.view([(requests[i][0], len(ids[i])) for i in order])
        rows = np.concatenate([np.arange(r.t0, r.t1) if wants[i] else np.arange(r.t1 - 1, r.t1)
                               for i, r in zip(order, view.runs)])
        segments = [len(ids[i]) for i in order]
        head_segments = [len(ids[i]) if wants[i] else 1 for i in order]
        if self.max_positions is not None and view.n_tokens and view.positions.max() >= self.max_positions:
            raise ContextOverflowError(f"position {view.positions.max()} is past the model's {self.max_positions} "
                                       "learned position embeddings")
        with self.ops.forward_pass(segments, head_segments):
            out = self.ops.run(self.logits_of, np.concatenate([ids[i] for i in order]), view,
                               None if len(rows) == view.n_tokens else rows)
            logits = self.ops.to_numpy(out)
        if not np.isfinite(logits).all():
            # NaN or inf weights (or a norm that divides by zero) would reach the sampler as garbage
            raise FormatError(self.gguf.path, "weights", "the model computed non-finite logits (NaN or inf): "
                              "its weights or hyperparameters are corrupt")
        view.commit()
        out: list[np.ndarray] = [np.empty(0)] * len(requests)
        start = 0
        for i in order:
            n = len(ids[i]) if wants[i] else 1
            out[i] = logits[start:start + n] if wants[i] else logits[start]
            start += n
        return out

    def _token_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            raise UsageError("forward needs at least one token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"token ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise UsageError(f"token id out of range [0, {self.n_vocab})")
        return ids.astype(np.int64)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        raise NotImplementedError

    def logits_of(self, ids: Any, positions: Any, cache: Any, rows: Any = None) -> Any:
        """One pass's logits: of the rows `rows` of the final hidden states (all when None)."""
        h = self.hidden(ids, positions, cache)
        return self.head(h if rows is None else h[rows])

    max_positions: int | None = None  # learned position embeddings (GPT-2): positions must stay below

    output: Any = None  # the output matrix (the token embedding when tied)
    output_b: Any = None  # its bias, where the architecture has one

    def head(self, h: Any) -> Any:
        """Logits from the final hidden states."""
        return self.ops.linear(h, self.output, self.output_b)
