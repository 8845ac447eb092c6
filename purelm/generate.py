"""Text generation over a model, a KV cache and a sampler: prefill, then one token at a time."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends.base import KVCache
from .errors import ContextOverflowError, UsageError
from .models.common import Model
from .sampling import Sampler, SamplingParams

N_BATCH = 512  # prompt tokens per forward pass while prefilling


@dataclass
class Chunk:
    """One step of a stream: the new text (may be empty while a UTF-8 character or a possible stop
    string is incomplete), the token, and why generation ended on the last chunk."""

    text: str
    token: int | None  # None on the chunk that reports an end-of-generation token
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class _StopMatcher:
    """Holds back text that might be the start of a stop string, and cuts at the first full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def prefill(model: Model, cache: KVCache, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
    """Feed `ids` in batches; return the logits of the last token (or of every token)."""
    outs = []
    for i in range(0, len(ids), N_BATCH):
        outs.append(model.forward(np.asarray(ids[i : i + N_BATCH]), cache, all_logits=all_logits))
    return np.concatenate(outs) if all_logits else outs[-1]


def truncate_prompt(ids: Sequence[int], n_ctx: int, max_tokens: int) -> list[int]:
    """The end of `ids` that leaves room for `max_tokens` new tokens in a context of `n_ctx`: at most
    n_ctx - max_tokens tokens (at least 1), or half the context when max_tokens alone would fill it
    (as llama.cpp keeps half when it drops the start). A prompt short enough is kept whole."""
    room = max(1, n_ctx - max_tokens if max_tokens < n_ctx else n_ctx // 2)
    return list(ids[-room:]) if len(ids) > room else list(ids)


def stream_tokens(model: Model, tokenizer, cache: KVCache, prompt: Sequence[int], params: SamplingParams,
                  max_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False,
                  timings: dict[str, float] | None = None) -> Iterator[Chunk]:
    """Generate after `prompt`, reusing whatever prefix of it `cache` already holds."""
    prompt = list(prompt)
    if not prompt:
        raise UsageError("the prompt is empty: give at least one token (or let the tokenizer add BOS)")
    if len(prompt) >= cache.n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but the context holds {cache.n_ctx}: shorten the prompt, "
            f"raise n_ctx (-c; the model was trained with {model.n_ctx_train}) or let it be cut "
            f"(truncate=True, --truncate)")
    sampler = Sampler(params)
    timings = timings if timings is not None else {}

    t0 = time.perf_counter()
    reuse = cache.tokens
    keep = 0
    while keep < min(len(reuse), len(prompt) - 1) and reuse[keep] == prompt[keep]:
        keep += 1
    cache.truncate(keep)
    logits = prefill(model, cache, prompt[keep:])
    cache.tokens = list(prompt)
    timings.update(prompt_tokens=len(prompt), prompt_eval_tokens=len(prompt) - keep,
                   prompt_s=time.perf_counter() - t0)

    decoder = tokenizer.stream_decoder()
    stopper = _StopMatcher(stop)
    history = list(prompt)
    eog = set() if ignore_eos else set(tokenizer.eog_ids)
    t1 = time.perf_counter()
    n_gen = 0
    try:
        while True:
            token = sampler(logits, history)
            n_gen += 1
            if token in eog:
                yield Chunk(stopper.feed(decoder.flush())[0] + stopper.flush(), None, "stop")
                return
            history.append(token)
            text, stopped = stopper.feed(decoder.feed(token))
            if stopped:
                yield Chunk(text, token, "stop")
                return
            if n_gen >= max_tokens or cache.n_past >= cache.n_ctx:
                yield Chunk(text + stopper.feed(decoder.flush())[0] + stopper.flush(), token, "length")
                return
            yield Chunk(text, token)
            logits = model.forward(np.array([token]), cache)
            cache.tokens.append(token)
    finally:
        timings.update(generated_tokens=n_gen, generate_s=time.perf_counter() - t1)
