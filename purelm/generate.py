"""Text generation over a model, a KV cache and a sampler: prefill, then one token at a time."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import KVCache
from .backends.kv_cache import BLOCK
from .errors import ContextOverflowError, UsageError
from .models.common import Model
from .sampling import Sampler, SamplingParams
from .speculative import accept

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
        self.matched: str | None = None  # the stop string that cut the text

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(i, k) for k, i in enumerate(self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            at, k = min(hits)
            out, self.matched = self.pending[:at], self.stops[k]
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
                  timings: dict[str, float] | None = None, drafter=None, n_draft: int = 0,
                  constraint: Any = None) -> Iterator[Chunk]:
    """Generate after `prompt`, reusing whatever prefix of it `cache` already holds. With a `drafter`
    (purelm.speculative), up to `n_draft` guessed tokens are checked per forward pass; with a
    `constraint` (purelm.grammar.Constraint), only the tokens its grammar allows are sampled."""
    prompt = list(prompt)
    if not prompt:
        raise UsageError("the prompt is empty: give at least one token (or let the tokenizer add BOS)")
    if len(prompt) >= cache.n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but the context holds {cache.n_ctx}: shorten the prompt, "
            f"raise n_ctx (-c; the model was trained with {model.n_ctx_train}) or let it be cut "
            f"(truncate=True, --truncate)")
    if constraint is not None and drafter is not None:  # drafts are checked without the grammar's mask
        raise UsageError("speculative decoding (lookup, draft) cannot be combined with a grammar or JSON schema")
    sampler = Sampler(params, tokenizer)
    timings = timings if timings is not None else {}

    t0 = time.perf_counter()
    reuse, seq = cache.tokens, cache.seqs[0]
    held = seq.prompt_logits
    if held is not None and held[0] == len(prompt) and reuse[:len(prompt)] == prompt:  # this prompt again
        keep = len(prompt)
        cache.truncate(keep)
        logits = held[1].copy()
    else:
        keep = 0
        while keep < min(len(reuse), len(prompt) - 1) and reuse[keep] == prompt[keep]:
            keep += 1
        cache.truncate(keep)
        logits = prefill(model, cache, prompt[keep:])
        seq.prompt_logits = (len(prompt), logits.copy())
    cache.tokens = list(prompt)
    timings.update(prompt_tokens=len(prompt), prompt_eval_tokens=len(prompt) - keep,
                   prompt_s=time.perf_counter() - t0)

    sample = _Sample(tokenizer, sampler, prompt, stop, ignore_eos, max_tokens, constraint=constraint)
    t1 = time.perf_counter()
    steps = drafted = accepted = 0
    try:
        chunk = sample.next(logits, room=cache.n_past < cache.n_ctx)
        while True:
            yield chunk
            if chunk.finish_reason:
                return
            n0 = cache.n_past  # where chunk.token goes
            # drafts must fit in the context, and past max_tokens they would be thrown away
            k = min(n_draft, cache.n_ctx - n0 - 1, max_tokens - sample.n_gen - 1)
            drafts = drafter.draft(sample.history, k)[:k] if drafter is not None and k > 0 else []
            logits = model.forward(np.array([chunk.token, *drafts]), cache, all_logits=bool(drafts))
            cache.tokens.extend([chunk.token, *drafts])
            steps += 1
            if not drafts:
                chunk = sample.next(logits, room=cache.n_past < cache.n_ctx)
                continue
            tokens = accept(sampler, sample.history, logits, drafts)
            drafted, accepted = drafted + len(drafts), accepted + len(tokens) - 1
            for i, token in enumerate(tokens):  # each as if sampled one step at a time
                chunk = sample.emit(token, room=n0 + 1 + i < cache.n_ctx)
                if chunk.finish_reason or i == len(tokens) - 1:
                    break
                yield chunk
            cache.truncate(n0 + 1 + i)  # keep the positions before the token just emitted
    finally:
        timings.update(generated_tokens=sample.n_gen, generate_s=time.perf_counter() - t1)
        if drafter is not None:
            timings.update(decode_steps=steps, draft_tokens=drafted, accepted_tokens=accepted)


class _Sample:
    """One sequence being generated: its sampler, the tokens so far, their text, the stop strings."""

    def __init__(self, tokenizer, sampler: Sampler, prompt: Sequence[int], stop: Sequence[str],
                 ignore_eos: bool, max_tokens: int, stop_ids: Iterable[int] = (), constraint: Any = None) -> None:
        self.sampler, self.max_tokens = sampler, max_tokens
        self.constraint = constraint  # purelm.grammar.Constraint: the tokens a grammar allows
        self.history = list(prompt)
        self.decoder = tokenizer.stream_decoder()
        self.stopper = _StopMatcher(stop)
        # end-of-generation tokens, and `stop_ids` (a chat template's end-of-turn tokens) even with ignore_eos
        self.eog = (set() if ignore_eos else set(tokenizer.eog_ids)) | set(stop_ids)
        if constraint is not None:  # where the grammar ends, the reply ends (ignore_eos or not)
            self.eog |= constraint.eos
        self.n_gen = 0
        self.tokens: list[int] = []
        self.last_token: int | None = None  # the token sampled last (an end-of-generation one included)
        self.finish_reason: str | None = None

    def next(self, logits: np.ndarray, room: bool) -> Chunk:
        """Sample the next token from `logits`; `room`: whether the context takes one more after it.
        The chunk's finish_reason is set when this sequence is done."""
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return self.emit(self.sampler(logits, self.history), room)

    def emit(self, token: int, room: bool) -> Chunk:
        """`next` for a token already chosen (a speculative step's accepted drafts)."""
        self.last_token = token
        self.n_gen += 1
        if token in self.eog:
            return self._end(Chunk(self.stopper.feed(self.decoder.flush())[0] + self.stopper.flush(), None, "stop"))
        self.history.append(token)
        self.tokens.append(token)
        text, stopped = self.stopper.feed(self.decoder.feed(token))
        if stopped:
            return self._end(Chunk(text, token, "stop"))
        if self.n_gen >= self.max_tokens or not room:
            return self._end(Chunk(text + self.stopper.feed(self.decoder.flush())[0] + self.stopper.flush(),
                                   token, "length"))
        if self.constraint is not None:  # a token the reply goes on after
            self.constraint.accept(token)
        return Chunk(text, token)

    def _end(self, chunk: Chunk) -> Chunk:
        self.finish_reason = chunk.finish_reason
        return chunk


def stream_batch(model: Model, tokenizer, n_ctx: int, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams, max_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False,
                 timings: dict[str, float] | None = None, constraint: Any = None) -> Iterator[tuple[int, Chunk]]:
    """Generate `n` continuations of each prompt together, every step one forward pass over all the
    sequences still going. Yields (index, chunk), index = prompt * n + sample; a sequence's last chunk
    has its finish_reason. The samples of one prompt share its cached positions (forks of one
    sequence). Sample i uses seed + i when a seed is given, so each is reproducible and they differ.
    `constraint`: a function that makes each sample its grammar's Constraint."""
    timings = timings if timings is not None else {}
    cache = model.new_cache(n_ctx)
    # checked before any work, so that a huge n fails at once
    blocks = cache.samples_blocks([len(p) for p in prompts], n, max_tokens)
    cache.check_room(blocks * cache.block_bytes, f"{len(prompts)} prompt(s) x n = {n} samples of up to "
                     f"{max_tokens} tokens ({blocks} blocks of {BLOCK} positions)")
    t0 = time.perf_counter()
    seqs = [cache.add() for _ in prompts]
    pending = [list(p) for p in prompts]
    last: list[np.ndarray | None] = [None] * len(prompts)
    while any(pending):  # prompts in passes of at most N_BATCH tokens in all
        budget, runs = N_BATCH, []
        for i, rest in enumerate(pending):
            if rest and budget > 0:
                runs.append((i, rest[:budget]))
                budget -= len(runs[-1][1])
        for (i, ids), logits in zip(runs, model.forward_batch(cache, [(seqs[i], ids) for i, ids in runs])):
            pending[i] = pending[i][len(ids):]
            last[i] = logits
    timings.update(prompt_tokens=sum(map(len, prompts)), prompt_s=time.perf_counter() - t0)

    t1 = time.perf_counter()
    active: dict[int, tuple[int, _Sample]] = {}  # index -> (sequence, its sample), while it runs
    samples: list[_Sample] = []
    logits_of: dict[int, np.ndarray] = {}
    for p, prompt in enumerate(prompts):
        for j in range(n):
            seq = seqs[p] if j == n - 1 else cache.fork(seqs[p])
            seed = None if params.seed is None else params.seed + j
            sampler = Sampler(dataclasses.replace(params, seed=seed), tokenizer)
            samples.append(_Sample(tokenizer, sampler, prompt, stop, ignore_eos, max_tokens,
                                   constraint=constraint() if constraint is not None else None))
            active[p * n + j] = (seq, samples[-1])
            logits_of[p * n + j] = last[p]
    try:
        while active:
            step = []
            for index in sorted(active):
                seq, sample = active[index]
                chunk = sample.next(logits_of[index], room=cache.seqs[seq].n_past < n_ctx)
                yield index, chunk
                if chunk.finish_reason:
                    cache.remove(seq)
                    del active[index]
                else:
                    step.append((index, seq, chunk.token))
            if step:
                for (index, _, _), logits in zip(step, model.forward_batch(cache, [(s, [t]) for _, s, t in step])):
                    logits_of[index] = logits
    finally:
        timings.update(generated_tokens=sum(s.n_gen for s in samples), generate_s=time.perf_counter() - t1)
