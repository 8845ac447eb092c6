"""Text embeddings: the model's final hidden states (after its output norm, where it has one) pooled
over the input's tokens and L2-normalized, as llama.cpp's `--embeddings` does (`embd_normalize` 2).
Pooling is what the file asks for (`{arch}.pooling_type`, which llama.cpp's converter writes for sentence-transformers
models: mean, the first token ([CLS]) or the last), else the mean; a caller may ask for another."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .backends.base import KVCache
from .backends.kv_cache import BLOCK
from .errors import ContextOverflowError, FormatError, UsageError
from .models.common import Model, Params

N_BATCH = 512  # tokens per pass, as prefill
POOLING = ("mean", "cls", "last")
# llama.cpp's pooling types by number; "none" (per-token vectors) has no one-vector answer: the mean
_FILE_POOLING = {0: "mean", 1: "mean", 2: "cls", 3: "last"}


def model_pooling(model: Model) -> str:
    """The pooling the model file asks for, else "mean"."""
    kind = Params(model.gguf).int("pooling_type", 0, lo=0, hi=4)
    if kind == 4:
        raise FormatError(model.gguf.path, f"{model.gguf.architecture}.pooling_type",
                          "is 4 (rank): a reranker, whose scores LLM.rerank, `purelm rerank` and the server's "
                          "/v1/rerank give; to embed with it anyway, ask for a pooling (mean, cls or last)")
    return _FILE_POOLING[kind]


def check_pooling(pooling: object) -> str | None:
    if pooling is not None and pooling not in POOLING:
        raise UsageError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
    return pooling


def hidden_states(model: Model, cache: KVCache, seq: int, ids: Sequence[int]) -> np.ndarray:
    """Final hidden states (len(ids), n_embd) of `ids` at `seq`'s next positions, stored in the cache
    as a forward pass would store them."""
    return hidden_states_many(model, cache, [(seq, ids)])[0]


def hidden_states_many(model: Model, cache: KVCache, runs: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
    """hidden_states of several sequences' token ids in one forward pass (each sequence a run of the
    KV cache): the weights are read once for all of them."""
    h = _forward(model, cache, runs, lambda h, firsts: h)
    ends = np.cumsum([len(r[1]) for r in runs])
    return [h[e - len(r[1]):e] for r, e in zip(runs, ends)]


def _forward(model: Model, cache: KVCache, runs: Sequence[tuple[int, Sequence[int]]], result) -> np.ndarray:
    """One forward pass over `runs` (sequence, token ids); `result(hidden states, first rows)` inside it
    (the first rows: each run's first token), as float32 numpy."""
    ids = [model._token_ids(r[1]) for r in runs]
    view = cache.view([(seq, len(i)) for (seq, _), i in zip(runs, ids)])
    if model.max_positions is not None and view.positions.max() >= model.max_positions:
        raise ContextOverflowError(f"an embedding input of {view.positions.max() + 1} tokens is longer than the "
                                   f"model's {model.max_positions} learned positions: shorten it")
    # The products take all the rows as one run (the attention keeps each sequence's): short inputs
    # then share one matrix product where the weights are float (f16, f32) rather than one each. With
    # such weights an embedding moves with its company by float32 rounding (~1e-7 of its values); the
    # integer kernels of quantized weights give each token the same bits in any company.
    segments = [sum(len(i) for i in ids)]
    with model.ops.forward_pass(segments, segments):
        out = model.ops.to_numpy(result(model.hidden(np.concatenate(ids), view.positions, view),
                                        [r.t0 for r in view.runs]))
    if not np.isfinite(out).all():
        raise FormatError(model.gguf.path, "weights", "the model computed non-finite values (NaN or inf): its "
                          "weights or hyperparameters are corrupt")
    view.commit()
    return out


def check_input(cache: KVCache, ids: Sequence[int]) -> None:
    if not ids:
        raise UsageError("an embedding input is empty: give at least one token")
    if len(ids) > cache.n_ctx:
        raise ContextOverflowError(f"an embedding input has {len(ids)} tokens but the context holds "
                                   f"{cache.n_ctx}: shorten it or raise the context length")


def normalized(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).astype(np.float32)


class Pooling:
    """One input's embedding, computed a chunk of at most `n_batch` tokens at a time in its own
    sequence of `cache` (the server interleaves the chunks with decode steps); an encoder's input
    (every token attends to every other) in one pass. `pooling`: one of POOLING, None for the file's."""

    def __init__(self, model: Model, cache: KVCache, ids: Sequence[int], n_batch: int = N_BATCH,
                 pooling: str | None = None) -> None:
        check_input(cache, ids)
        self.pooling = check_pooling(pooling) or model_pooling(model)
        self.model, self.cache, self.ids = model, cache, list(ids)
        self.n_batch = n_batch if model.causal else len(self.ids)
        self.seq: int | None = None
        self.done = 0
        self.sum: np.ndarray | None = None  # mean: the sum so far; cls, last: the row picked so far

    def step(self) -> np.ndarray | None:
        """Run the next chunk; the embedding (float32, norm 1) once the last one ran, else None."""
        if self.seq is None:
            self.seq = self.cache.add()
        try:
            chunk = self.ids[self.done:self.done + self.n_batch]
            h = hidden_states(self.model, self.cache, self.seq, chunk).astype(np.float64)
            if self.pooling == "mean":
                self.sum = h.sum(0) if self.sum is None else self.sum + h.sum(0)
            elif self.pooling == "last" or self.sum is None:  # cls: the first chunk's first row
                self.sum = h[0] if self.pooling == "cls" else h[-1]
            self.done += len(chunk)
        except BaseException:
            self.close()
            raise
        if self.done < len(self.ids):
            return None
        self.close()
        return normalized(self.sum / len(self.ids) if self.pooling == "mean" else self.sum)

    def close(self) -> None:
        """Free the sequence (also for an input given up half-way)."""
        if self.seq is not None and self.seq in self.cache.seqs:
            self.cache.remove(self.seq)
        self.seq = None


def embed_ids(model: Model, cache: KVCache, ids: Sequence[int], n_batch: int = N_BATCH,
              pooling: str | None = None) -> np.ndarray:
    """The embedding of one input's token ids, computed in a fresh sequence of `cache` (freed after)."""
    pooling = Pooling(model, cache, ids, n_batch, pooling)
    while True:
        v = pooling.step()
        if v is not None:
            return v


def group_end(inputs: Sequence[Sequence[int]], start: int, n_batch: int) -> int:
    """The end of the group of inputs from `start` that share a pass: at least one, and as many as fit
    in n_batch positions counted in the KV cache's blocks (each input is a sequence of its own, and
    takes whole blocks: counting tokens alone, many short inputs would grow the cache far past
    n_batch positions, and it keeps its size)."""
    end, n = start, 0
    while end < len(inputs):
        cost = -(-len(inputs[end]) // BLOCK) * BLOCK
        if end > start and n + cost > n_batch:
            break
        n += cost
        end += 1
    return end


def _groups(cache: KVCache, inputs: Sequence[Sequence[int]], n_batch: int):
    """Indices of `inputs` in the groups group_end makes, each input checked first."""
    for ids in inputs:
        check_input(cache, ids)
    start = 0
    while start < len(inputs):
        end = group_end(inputs, start, n_batch)
        yield list(range(start, end))
        start = end


def _run_group(model: Model, cache: KVCache, inputs: list[Sequence[int]], run) -> Any:
    """`run([(sequence, ids), ...])` over `inputs`, each in a fresh sequence of `cache` (freed after)."""
    seqs = [cache.add() for _ in inputs]
    try:
        return run(list(zip(seqs, inputs)))
    finally:
        for s in seqs:
            cache.remove(s)


def embed_many(model: Model, cache: KVCache, inputs: Sequence[Sequence[int]], n_batch: int = N_BATCH,
               pooling: str | None = None) -> np.ndarray:
    """The embeddings (len(inputs), n_embd) of several inputs' token ids: inputs of up to `n_batch`
    tokens together in passes of up to `n_batch` tokens (each in its own sequence of `cache`, freed
    after), a longer one of a decoder alone through Pooling (a chunk at a time)."""
    kind = check_pooling(pooling) or model_pooling(model)
    out = np.zeros((len(inputs), model.dim), np.float32)
    for group in _groups(cache, inputs, n_batch):
        if len(inputs[group[0]]) > n_batch and model.causal:
            out[group[0]] = embed_ids(model, cache, inputs[group[0]], n_batch, kind)
            continue
        states = _run_group(model, cache, [inputs[i] for i in group],
                            lambda runs: hidden_states_many(model, cache, runs))
        for i, h in zip(group, states):
            h = h.astype(np.float64)
            out[i] = normalized(h.mean(0) if kind == "mean" else h[0] if kind == "cls" else h[-1])
    return out


def rank_many(model: Model, cache: KVCache, inputs: Sequence[Sequence[int]], n_batch: int = N_BATCH) -> np.ndarray:
    """A reranker's scores (len(inputs), n_cls_out) of inputs that each join a query and a document
    (Tokenizer.encode_pair), packed into passes as embed_many packs them: the classification head
    over each input's first token (llama.cpp's "rank" pooling)."""
    if model.causal or not getattr(model, "n_cls_out", 0):
        raise UsageError(f"{model.gguf.path}: ranking needs a reranker (an encoder with a classification head, "
                         "cls.output.weight); this model has none")
    out = np.zeros((len(inputs), model.n_cls_out), np.float32)

    for group in _groups(cache, inputs, n_batch):
        out[group] = _run_group(model, cache, [inputs[i] for i in group], lambda runs: _forward(
            model, cache, runs, lambda h, firsts: model.classify(h[firsts])))
    return out
