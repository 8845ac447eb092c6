"""Text embeddings: the model's final hidden states (after its output norm), mean-pooled over the
input's tokens and L2-normalized, as llama.cpp's `--embeddings` does by default (`--pooling mean`,
`embd_normalize` 2)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backends.base import KVCache
from .errors import ContextOverflowError, FormatError, UsageError
from .models.common import Model

N_BATCH = 512  # tokens per pass, as prefill


def hidden_states(model: Model, cache: KVCache, seq: int, ids: Sequence[int]) -> np.ndarray:
    """Final hidden states (len(ids), n_embd) of `ids` at `seq`'s next positions, stored in the cache
    as a forward pass would store them."""
    ids = model._token_ids(ids)
    view = cache.view([(seq, len(ids))])
    with model.ops.forward_pass([len(ids)], [len(ids)]):
        h = model.ops.to_numpy(model.hidden(ids, view.positions, view))
    if not np.isfinite(h).all():
        raise FormatError(model.gguf.path, "weights", "the model computed non-finite hidden states (NaN or inf): "
                          "its weights or hyperparameters are corrupt")
    view.commit()
    return h


class Pooling:
    """One input's embedding, computed a chunk of at most `n_batch` tokens at a time in its own
    sequence of `cache` (the server interleaves the chunks with decode steps)."""

    def __init__(self, model: Model, cache: KVCache, ids: Sequence[int], n_batch: int = N_BATCH) -> None:
        if not ids:
            raise UsageError("an embedding input is empty: give at least one token")
        if len(ids) > cache.n_ctx:
            raise ContextOverflowError(f"an embedding input has {len(ids)} tokens but the context holds "
                                       f"{cache.n_ctx}: shorten it or raise the context length")
        self.model, self.cache, self.ids, self.n_batch = model, cache, list(ids), n_batch
        self.seq: int | None = None
        self.done = 0
        self.sum: np.ndarray | None = None

    def step(self) -> np.ndarray | None:
        """Run the next chunk; the embedding (float32, norm 1) once the last one ran, else None."""
        if self.seq is None:
            self.seq = self.cache.add()
        try:
            chunk = self.ids[self.done:self.done + self.n_batch]
            h = hidden_states(self.model, self.cache, self.seq, chunk).astype(np.float64)
            self.sum = h.sum(0) if self.sum is None else self.sum + h.sum(0)
            self.done += len(chunk)
        except BaseException:
            self.close()
            raise
        if self.done < len(self.ids):
            return None
        self.close()
        v = self.sum / len(self.ids)
        norm = float(np.linalg.norm(v))
        return (v / norm if norm > 0 else v).astype(np.float32)

    def close(self) -> None:
        """Free the sequence (also for an input given up half-way)."""
        if self.seq is not None and self.seq in self.cache.seqs:
            self.cache.remove(self.seq)
        self.seq = None


def embed_ids(model: Model, cache: KVCache, ids: Sequence[int], n_batch: int = N_BATCH) -> np.ndarray:
    """The embedding of one input's token ids, computed in a fresh sequence of `cache` (freed after)."""
    pooling = Pooling(model, cache, ids, n_batch)
    while True:
        v = pooling.step()
        if v is not None:
            return v
