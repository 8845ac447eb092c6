"""What every model file shares: reading hyperparameters and weights from a GGUF file with clear errors,
and the forward-pass bookkeeping around the KV cache."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import Backend, KVCache
from ..errors import ContextOverflowError, FormatError
from ..formats.gguf import GGUFFile, Tensor


class Params:
    """`{arch}.*` hyperparameters, with errors that name the missing key."""

    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf, self.arch = gguf, gguf.architecture

    def get(self, key: str, default: Any = None) -> Any:
        return self.gguf.metadata.get(f"{self.arch}.{key}", default)

    def need(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.gguf.metadata:
            raise FormatError(self.gguf.path, full, "required metadata key is missing")
        return self.gguf.metadata[full]


class Weights:
    """Fetches tensors by GGUF name, checks their shapes, and hands them to the backend."""

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf, self.backend = gguf, backend

    def tensor(self, name: str, shape: tuple[int, ...], optional: bool = False) -> Tensor | None:
        t = self.gguf.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise FormatError(self.gguf.path, f"tensor {name!r}", f"is missing (expected shape {shape})")
        if tuple(t.shape) != tuple(shape) and not (len(shape) == 1 and t.n_elements == shape[0]):
            raise FormatError(self.gguf.path, f"tensor {name!r}", f"has shape {t.shape}, expected {shape}")
        return t

    def matrix(self, name: str, shape: tuple[int, int], optional: bool = False) -> Any:
        t = self.tensor(name, shape, optional)
        return None if t is None else self.backend.weight(t)

    def matrices(self, specs: list[tuple[str, tuple[int, int]]]) -> Any:
        """Several matrices applied to the same input, for `ops.linear_many`."""
        return self.backend.weights([self.tensor(name, shape) for name, shape in specs])

    def vector(self, name: str, n: int, optional: bool = False) -> Any:
        t = self.tensor(name, (n,), optional)
        return None if t is None else self.backend.vector(t)


class Model:
    """Base of every architecture: a forward pass over a KV cache, returning logits."""

    n_ctx_train: int
    n_vocab: int

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf, self.ops = gguf, backend

    def read_sizes(self, p: Params, rms_norm: bool, n_ctx_default: int = 2048,
                   n_kv_head_default: int | None = None) -> None:
        """The sizes every decoder has: layers, width, heads, kv heads, head size, norm epsilon,
        training context and vocabulary (from the embedding's rows when the key is absent)."""
        self.n_layer = p.need("block_count")
        self.dim = p.need("embedding_length")
        self.n_head = p.need("attention.head_count")
        self.n_kv_head = p.get("attention.head_count_kv", n_kv_head_default or self.n_head)
        self.head_dim = p.get("attention.key_length", self.dim // self.n_head)
        eps_key = "attention.layer_norm_rms_epsilon" if rms_norm else "attention.layer_norm_epsilon"
        self.eps = p.get(eps_key, 1e-5)
        self.n_ctx_train = p.get("context_length", n_ctx_default)
        embd = self.gguf.tensors.get("token_embd.weight")
        self.n_vocab = embd.shape[0] if embd is not None else p.need("vocab_size")

    def new_cache(self, n_ctx: int) -> KVCache:
        raise NotImplementedError

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `ids` (1-D) at positions cache.n_past...; return float32 logits for the last token
        (shape (vocab,)) or for every token (shape (len(ids), vocab))."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        n_tok = len(ids)
        if n_tok == 0:
            raise ValueError("forward needs at least one token")
        if cache.n_past + n_tok > cache.n_ctx:
            raise ContextOverflowError(
                f"{cache.n_past + n_tok} tokens do not fit in the context of {cache.n_ctx} tokens")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        cache.reserve(cache.n_past + n_tok)
        positions = np.arange(cache.n_past, cache.n_past + n_tok)
        h = self.hidden(ids, positions, cache)
        cache.commit(n_tok)
        if not all_logits:
            h = h[-1:]
        logits = self.ops.to_numpy(self.head(h))
        return logits if all_logits else logits[0]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        raise NotImplementedError

    output: Any = None  # the output matrix (the token embedding when tied)
    output_b: Any = None  # its bias, where the architecture has one

    def head(self, h: Any) -> Any:
        """Logits from the final hidden states."""
        return self.ops.linear(h, self.output, self.output_b)
