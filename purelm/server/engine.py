"""The continuous-batching engine behind `purelm serve`.

One background thread owns the model and one KV cache holding many sequences. Requests arrive from
asyncio handlers through a thread-safe queue. Each step:

1. drops cancelled requests (their client left) and frees their sequences;
2. admits waiting requests, first come first served, while `parallel` slots are free (a request with
   `n` samples takes `n` slots);
3. runs ONE forward pass over one decode token of every running sample plus prompt chunks of the
   requests still prefilling, at most `batch` prompt tokens in all (so a long prompt does not stall
   the others' decoding for more than a chunk);
4. samples each running sample's next token with its own sampler (seed, penalties, logit bias, an
   llguidance grammar's token mask), computes logprobs where asked, and hands the pieces of text to
   each request's asyncio queue (`loop.call_soon_threadsafe`). A request asking for its prompt's
   logprobs (the server's `echo`) gets them chunk by chunk as its prompt is evaluated.

With `lookup` (`purelm serve --lookup N`), a running sample's decode token comes with up to N tokens
drafted by prompt lookup from its prompt and text so far (purelm.speculative): the pass checks them
all, the agreeing ones are kept (the rejection rule when sampling) and the cache forgets the rest, as
`LLM.stream_chunks(lookup=N)` does for one sequence (the sampler's logit bias and penalties apply to
the drafts' rows too). Requests with a grammar decode one token a step.

A request whose prompt is fully prefilled forks its sequence `n - 1` times (the samples share the
prompt's cached blocks). A finished sample's sequence is kept (the last `parallel` of them, least
recently used dropped first) so that a later prompt that starts with the same tokens (a system prompt,
the earlier turns of a chat) forks it and evaluates only the rest. An exception in a step fails the
requests that were in that step's pass; the engine goes on serving the others and the next ones.

Memory: a request is refused at submission when its worst case (`n` samples of `max_tokens`) does
not fit in the memory available. Requests that each fit but not all together take their cache
blocks before each pass (`_reserve`): retained prefixes are dropped first, then a sample's drafts,
then prompts still prefilling give their blocks back and start again later (vLLM's preemption by
recomputation); a prompt waits for the blocks that running requests free as they end, and a sample
that still finds none ends its own request with a MemoryLimitError (503); the pass, and the other
requests in it, go on.

The backend computes each sequence's part of a pass as it would alone, so a decode token's logits do
not depend on the other requests in the batch: a greedy reply is the same served alone or among others.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..embeddings import Pooling, embed_many, group_end, rank_many
from ..errors import ContextOverflowError, GenerationError, MemoryLimitError, PurelmError, UsageError
from ..generate import _Sample
from ..grammar import Constraint
from ..sampling import Sampler, SamplingParams, check_int
from ..speculative import LookupDrafter, accept, max_drafts

log = logging.getLogger("purelm.server")

MIN_PREFIX = 16  # tokens a cached prefix must share with a new prompt to be reused


class QueueFullError(PurelmError):
    """The engine's waiting queue is full (the server answers 503)."""


class EngineStoppedError(PurelmError):
    """The engine was shut down."""


@dataclass
class GenerationRequest:
    """What the engine needs to run one prompt: token ids and settings, all checked by the caller."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # end-of-turn tokens besides the model's end-of-generation ones
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k likeliest
    grammar: str | None = None  # a compiled grammar (purelm.grammar.compile_grammar)
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob and the k likeliest
    post_sampling_probs: bool = False  # logprobs from the candidates the sampler drew from, not the model's
    lora: tuple[float, ...] | None = None  # the LoRA adapters' scales (one per adapter); None: the server's


@dataclass
class Piece:
    """One sampled token of one sample (`index` in 0..n-1): its text (may be empty while a UTF-8
    character or a possible stop string is incomplete), and on a sample's last piece the reason it
    ended. `token` is None on the piece that reports an end-of-generation token."""

    index: int
    text: str
    token: int | None
    finish_reason: str | None = None
    logprob: float | None = None  # of the sampled token (the end-of-generation one included)
    top: list[tuple[int, float]] | None = None  # the likeliest tokens and their logprobs
    sampled: int | None = None  # the sampled token, end-of-generation ones included
    stop: str | None = None  # on the last piece of a sample that a stop string ended: that string


@dataclass
class PromptLogprobs:
    """The logprobs of prompt tokens fed..fed+len(entries) (GenerationRequest.prompt_logprobs), each
    (token, logprob, the likeliest tokens and their logprobs) given the tokens before it; the prompt's
    first token has none (logprob None). Sent as the prompt is evaluated, before the samples' pieces."""

    entries: list[tuple[int, float | None, list[tuple[int, float]]]]


PROMPT_LOGPROBS_CHUNK = 128  # prompt tokens a step for a request asking its prompt's logprobs (their logits: 25 MB)

_CANCELLED = object()


class Handle:
    """The asyncio side of a request: iterate it for lists of pieces (or embedding vectors); cancel
    it when the client leaves."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop, n_open: int) -> None:
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n_open = n_open  # samples (or inputs) not finished
        self.cancelled = False
        self.finished = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        """Stop generating for this request and free its cache (at the engine's next step); whoever
        iterates the handle sees the end of it."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.engine._wake()
            self._push(_CANCELLED)

    def _push(self, item: Any) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled = True

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while self.n_open > 0:
            item = await self.queue.get()
            if item is _CANCELLED:
                break
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            for p in item:
                if p.finish_reason if isinstance(p, Piece) else not isinstance(p, PromptLogprobs):
                    self.n_open -= 1
            yield item
        self.finished = True


@dataclass
class _Slot:
    """One sample being generated."""

    job: "_Job"
    index: int
    seq: int
    sample: _Sample
    pending: int | None = None  # the token to feed at the next step
    drafter: LookupDrafter | None = None  # prompt lookup (Engine's `lookup`), where the request allows it
    drafts: list[int] = field(default_factory=list)  # the tokens drafted after `pending` in this step's pass


class _Job:
    def __init__(self, req: GenerationRequest, handle: Handle) -> None:
        self.req, self.handle = req, handle
        self.seq: int | None = None
        self.fed = 0  # prompt tokens stored in the cache
        self.slots: list[_Slot] = []
        self.n_running = 0
        self.released = False  # its slots given back
        self.reused = 0  # prompt tokens taken from a cached prefix


class _EmbedJob:
    def __init__(self, inputs: list[list[int]], handle: Handle, rank: bool = False) -> None:
        self.inputs, self.handle = inputs, handle
        self.rank = rank  # a reranker's scores (embeddings.rank_many) instead of embeddings
        self.index = 0
        self.started = False
        self.pooling: Pooling | None = None


class Engine:
    """See the module's docstring. `llm`: a loaded `purelm.LLM` (its model and tokenizer are used
    from the engine's thread only; its own cache is left alone)."""

    def __init__(self, llm: Any, parallel: int = 8, batch: int = 512, max_queue: int = 64,
                 prefix_cache: bool = True, metrics: Any = None, lookup: int = 0, pooling: str | None = None) -> None:
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.pooling = pooling  # embeddings' (embeddings.POOLING; None: the model file's)
        self.n_ctx = llm.n_ctx
        self.parallel, self.batch, self.max_queue = parallel, batch, max_queue
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.cache = self.model.new_cache(self.n_ctx)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting_count = 0
        self._waiting: deque[_Job] = deque()
        self._prefilling: list[_Job] = []
        self._running: list[_Slot] = []
        self._embeds: deque[_EmbedJob] = deque()
        self._retained: OrderedDict[int, list[int]] = OrderedDict()  # finished sequences: seq -> tokens
        self.slots_used = 0
        self._stop = False
        self._active = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_evaluated = 0
        self.prompt_tokens_reused = 0
        self.prefix_hits = 0  # requests that started from a cached prefix (per-replica stats under Ray)
        self.n_draft = min(check_int("lookup", lookup, 0), max_drafts(self.model))  # per sample and step (0: none)
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.adapters = list(getattr(llm, "adapters", ()))
        # the LoRA scales of a request that names none (POST /lora-adapters sets them; a tuple, swapped whole)
        self.lora_scales: tuple[float, ...] = tuple(a.scale for a in self.adapters)

    # -- life
    def start(self) -> "Engine":
        """Run the engine in a background thread (see `run` for the faster way)."""
        self._active = True
        self._thread = threading.Thread(target=self.run, name="purelm-engine", daemon=True)
        self._thread.start()
        return self

    def run(self, until: Any = None) -> None:
        """Run the engine in the calling thread until `stop()` (or until `until()` is true; it is
        asked at least every half second). numba's parallel kernels start 2-4x slower from a thread
        other than the main one (OpenMP), which halves a single sequence's decode speed on 2 cores:
        `purelm serve` runs the engine here, in the main thread, and the HTTP server beside it."""
        self._active = True
        try:
            while not self._stop and not (until is not None and until()):
                busy = bool(self._waiting or self._prefilling or self._running or self._embeds)
                self._intake(block=not busy)
                if self._stop:
                    break
                try:
                    self._step()
                except Exception:  # a bug outside any request's pass: log it, keep serving
                    log.exception("engine step failed")
        finally:
            self._active = False
            self._shutdown()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def n_waiting(self) -> int:
        return self._waiting_count

    @property
    def running(self) -> bool:
        return self._active and not self._stop

    # -- submitting (event loop thread)
    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; raises QueueFullError when `max_queue` requests are already waiting."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        if not self.model.causal:
            raise UsageError(f"{self.model.gguf.architecture} is an embedding model: it serves /v1/embeddings (and a "
                             "reranker /v1/rerank), not generation")
        if req.n > self.parallel:
            raise ContextOverflowError(f"n = {req.n} is more than the server's {self.parallel} slots")
        if len(req.prompt) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(req.prompt)} tokens but the context holds {self.n_ctx}")
        blocks = self.cache.samples_blocks([len(req.prompt)], req.n, req.max_tokens)
        self.cache.check_room(blocks * self.cache.block_bytes, f"n = {req.n} samples of up to {req.max_tokens} tokens")
        handle = Handle(self, loop or asyncio.get_running_loop(), req.n)
        self._enqueue(_Job(req, handle))
        return handle

    def submit_embeddings(self, inputs: list[list[int]], loop: asyncio.AbstractEventLoop | None = None,
                          rank: bool = False) -> Handle:
        """Queue embedding inputs (token ids); the handle yields [(index, vector)] per input (`rank`:
        a reranker's scores of query-document inputs, Tokenizer.encode_pair)."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        handle = Handle(self, loop or asyncio.get_running_loop(), len(inputs))
        self._enqueue(_EmbedJob(inputs, handle, rank))
        return handle

    def _enqueue(self, job: Any) -> None:
        with self._lock:
            # slots free now take requests at the next step; beyond them `max_queue` may wait
            if self._waiting_count >= self.max_queue + max(0, self.parallel - self.slots_used):
                raise QueueFullError(f"the server is busy: {self._waiting_count} requests are waiting "
                                     f"(--queue {self.max_queue}); try again later")
            self._waiting_count += 1
        self._inbox.put(job)

    def _wake(self) -> None:
        self._inbox.put(None)

    def _dequeued(self) -> None:
        with self._lock:
            self._waiting_count -= 1

    # -- constrained decoding
    # -- the engine's thread
    def _intake(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Job):
                self._waiting.append(item)
            elif isinstance(item, _EmbedJob):
                self._embeds.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _shutdown(self) -> None:
        err = EngineStoppedError("the server is shutting down")
        for job in list(self._waiting) + self._prefilling + list({s.job: 0 for s in self._running}):
            job.handle._push(err)
        for ej in self._embeds:
            ej.handle._push(err)
        while True:  # and whatever was submitted but not taken in
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.handle._push(err)
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._embeds.clear()

    def _step(self) -> None:
        self._reap()
        self._admit()
        self._generate()
        if self._embeds:
            self._embed_step()
        self.steps += 1

    def _reap(self) -> None:
        """Drop the requests whose clients left."""
        for job in [j for j in self._waiting if j.handle.cancelled]:
            self._waiting.remove(job)
            self._dequeued()
        for job in [j for j in self._prefilling if j.handle.cancelled]:
            self._finish_job(job, None)
        for job in {s.job: 0 for s in self._running if s.job.handle.cancelled}:
            self._finish_job(job, None)
        for ej in [e for e in self._embeds if e.handle.cancelled]:
            self._embeds.remove(ej)
            if ej.pooling is not None:
                ej.pooling.close()
            if not ej.started:
                self._dequeued()

    def _admit(self) -> None:
        while self._waiting and self._waiting[0].req.n <= self.parallel - self.slots_used:
            req = self._waiting[0].req
            want = self.lora_scales if req.lora is None else req.lora
            if self._embeds and not self._embeds[0].started and want != self.lora_scales:
                break  # an embedding waits for the server's scales: let the requests in flight end
            if not self._use_scales(want):
                break
            job = self._waiting.popleft()
            self._dequeued()
            self.slots_used += job.req.n
            try:  # (a prompt's logprobs need its every position evaluated: no cached prefix)
                job.seq, job.fed = self._new_sequence(job.req.prompt) if job.req.prompt_logprobs is None \
                    else (self.cache.add(), 0)
            except Exception as e:
                log.exception("admitting a request failed")
                self._release(job)
                job.handle._push(GenerationError(f"could not start the request: {e}"))
                continue
            job.reused = job.fed
            self.prompt_tokens_reused += job.fed
            self.prefix_hits += job.fed > 0
            self._prefilling.append(job)
            if self.metrics:
                self.metrics.admitted(job.fed)

    def _use_scales(self, want: tuple[float, ...]) -> bool:
        """Whether a request for the LoRA scales `want` can start now: they are in effect, or are put in
        effect now that nothing else runs (a pass has one set of scales: the requests in flight end
        first, as llama-server's slots do). A change drops the retained prefixes, made with the old."""
        if want == tuple(a.scale for a in self.adapters):
            return True
        if self._prefilling or self._running or any(e.started for e in self._embeds):
            return False
        for adapter, scale in zip(self.adapters, want):
            adapter.scale = scale
        while self._retained:
            self.cache.remove(self._retained.popitem()[0])
        return True

    def _new_sequence(self, prompt: list[int]) -> tuple[int, int]:
        """A sequence for `prompt`: a fork of the retained one sharing its longest prefix (at least
        MIN_PREFIX tokens, at most all but the prompt's last token), else a new one."""
        best, best_n = None, 0
        if self.prefix_cache and self._retained:
            p = np.asarray(prompt[:-1], np.int64)
            for seq, toks in self._retained.items():
                m = min(len(p), len(toks))
                if m <= best_n:
                    continue
                diff = np.flatnonzero(np.asarray(toks[:m], np.int64) != p[:m])
                k = int(diff[0]) if len(diff) else m
                if k > best_n:
                    best, best_n = seq, k
        if best is None or best_n < MIN_PREFIX:
            return self.cache.add(), 0
        self._retained.move_to_end(best)
        seq = self.cache.fork(best)
        self.cache.truncate(best_n, seq)
        return seq, best_n

    def _retain(self, seq: int, tokens: list[int]) -> None:
        if not self.prefix_cache or self.cache.seqs[seq].n_past != len(tokens) or len(tokens) < MIN_PREFIX:
            self.cache.remove(seq)
            return
        self._retained[seq] = tokens
        while len(self._retained) > self.parallel:
            old, _ = self._retained.popitem(last=False)
            self.cache.remove(old)

    def _generate(self) -> None:
        runs: list[tuple[int, list[int], Any]] = []
        for s in self._running:
            s.drafts = self._draft(s)
            runs.append((s.seq, [s.pending, *s.drafts], s))
        budget = self.batch
        for job in self._prefilling:
            if budget <= 0:
                break
            chunk = budget if job.req.prompt_logprobs is None else min(budget, PROMPT_LOGPROBS_CHUNK)
            ids = job.req.prompt[job.fed:job.fed + chunk]
            runs.append((job.seq, ids, job))
            budget -= len(ids)
        runs = self._reserve(runs)
        if not runs:
            return
        try:
            out = self.model.forward_batch(self.cache, [(seq, ids) for seq, ids, _ in runs], all_logits=[
                len(ids) > 1 and (isinstance(o, _Slot) or o.req.prompt_logprobs is not None) for _, ids, o in runs])
        except Exception as e:  # fail the requests of this pass, keep the engine
            log.exception("forward pass failed")
            err = e if isinstance(e, MemoryLimitError) else GenerationError(f"the forward pass failed: {e}")
            for job in {(o.job if isinstance(o, _Slot) else o): 0 for _, _, o in runs}:
                self._finish_job(job, err)
            return
        pushes: dict[Handle, list[Piece]] = {}
        failed: dict[_Job, Exception] = {}
        for (seq, ids, owner), logits in zip(runs, out):
            if isinstance(owner, _Slot):
                if owner.job in failed:
                    continue
                try:
                    if owner.drafts:
                        self._accept(owner, logits, pushes)
                    else:
                        self._sample(owner, logits, pushes)
                except Exception as e:
                    log.exception("sampling failed")
                    failed[owner.job] = e
            else:
                job = owner
                if job.req.prompt_logprobs is not None:
                    logits = np.atleast_2d(logits)
                    pushes.setdefault(job.handle, []).append(self._prompt_logprobs(job, logits))
                    logits = logits[-1]
                job.fed += len(ids)
                self.prompt_tokens_evaluated += len(ids)
                if self.metrics:
                    self.metrics.prompt_tokens.inc(len(ids))
                if job.fed == len(job.req.prompt):
                    self._prefilling.remove(job)
                    try:
                        self._start_samples(job, logits, pushes)
                    except Exception as e:
                        log.exception("starting the samples failed")
                        failed[job] = e
        # free the finished samples first, so that a client told "finished" finds its slot free
        done = [s for s in self._running if s.sample.finish_reason and s.job not in failed]
        if done:
            self._running = [s for s in self._running if not s.sample.finish_reason or s.job in failed]
            for s in done:
                self._end_slot(s, keep=True)
        by_loop: dict[Any, list[tuple[Handle, list[Piece]]]] = {}
        for handle, pieces in pushes.items():
            if handle.t_first is None and any(isinstance(p, Piece) for p in pieces):
                handle.t_first = time.perf_counter()
                if self.metrics:
                    self.metrics.ttft.observe(handle.t_first - handle.t_submit)
            by_loop.setdefault(handle.loop, []).append((handle, pieces))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                for handle, _ in items:
                    handle.cancelled = True
        for job, e in failed.items():
            self._finish_job(job, GenerationError(f"sampling failed: {e}"))

    def _reserve(self, runs: list[tuple[int, list[int], Any]]) -> list[tuple[int, list[int], Any]]:
        """The runs of this step's pass whose cache blocks could be taken now, before the pass, so
        that memory running out fails no pass. When blocks run short: the retained prefixes go first
        (oldest first); a sample drops its drafts; prompts still prefilling give their blocks back and
        start again later (newest first; not those sending their prompt's logprobs); then the sample
        that finds no block ends its request with the MemoryLimitError (the server's 503). A prompt
        chunk that finds none waits for a later step while other requests run (they free blocks as
        they end), and fails when nothing else runs."""
        kept: list[tuple[int, list[int], Any]] = []
        restarted: set[int] = set()
        for seq, ids, owner in runs:
            job = owner.job if isinstance(owner, _Slot) else owner
            gone = owner.seq < 0 if isinstance(owner, _Slot) else job.seq is None  # (_end_slot, _finish_job)
            if gone or id(job) in restarted:
                continue  # failed, or restarted, earlier in this loop
            try:
                self._reserve_positions(seq, ids, owner, kept, restarted)
            except MemoryLimitError as e:
                if isinstance(owner, _Slot) or not (self._running or kept):
                    self._finish_job(job, e)  # its blocks are free for the runs after it
                    kept = [r for r in kept if (r[2].job if isinstance(r[2], _Slot) else r[2]) is not job]
                continue
            except Exception:  # the pass meets it too, and fails this step's requests
                pass
            if isinstance(owner, _Slot):
                ids = [owner.pending, *owner.drafts]
            kept.append((seq, ids, owner))
        return kept

    def _reserve_positions(self, seq: int, ids: list[int], owner: Any, kept: list, restarted: set[int]) -> None:
        """cache.reserve for a run, making room as _reserve says when the memory runs out."""
        while True:
            try:
                return self.cache.reserve(self.cache.seqs[seq].n_past + len(ids), seq)
            except MemoryLimitError:
                if self._retained:
                    old, _ = self._retained.popitem(last=False)
                    self.cache.remove(old)
                    continue
                if not isinstance(owner, _Slot):
                    raise
                if owner.drafts:
                    owner.drafts = []
                    ids = [owner.pending]
                    continue
                busy = {id(r[2]) for r in kept}
                victims = [j for j in self._prefilling if j.req.prompt_logprobs is None and j.seq is not None
                           and id(j) not in busy and id(j) not in restarted]
                if not victims:
                    raise
                victim = victims[-1]
                self.cache.remove(victim.seq)
                victim.seq, victim.fed = self.cache.add(), 0
                restarted.add(id(victim))

    def _prompt_logprobs(self, job: _Job, rows: np.ndarray) -> PromptLogprobs:
        """The logprobs of the prompt tokens that a chunk's logits `rows` predict (the chunk's last
        row predicts the first sampled token, not a prompt token); the first token has none."""
        prompt, k = job.req.prompt, job.req.prompt_logprobs
        entries: list[tuple[int, float | None, list[tuple[int, float]]]] = []
        if job.fed == 0:
            entries.append((prompt[0], None, []))
        for i in range(min(len(rows), len(prompt) - 1 - job.fed)):
            token = prompt[job.fed + i + 1]
            lp, top = _logprobs(rows[i], token, k)
            entries.append((token, lp, top))
        return PromptLogprobs(entries)

    def _start_samples(self, job: _Job, logits: np.ndarray, pushes: dict) -> None:
        req = job.req
        if req.max_tokens == 0:  # the prompt alone (its logprobs, an echo): each sample ends at once
            pushes.setdefault(job.handle, []).extend(Piece(j, "", None, "length") for j in range(req.n))
            self._retain(job.seq, list(req.prompt))
            job.seq = None
            self._release(job)
            return
        constraints = [None if req.grammar is None else Constraint(self.tokenizer, req.grammar, req.stop_ids)
                       for _ in range(req.n)]
        # each sample's sampler before any fork of the sequence: a sampler that fails leaves no fork behind
        samplers = [Sampler(dataclasses.replace(req.params, seed=None if req.params.seed is None
                                                else req.params.seed + j), self.tokenizer) for j in range(req.n)]
        for j, sampler in enumerate(samplers):
            if req.post_sampling_probs and req.logprobs is not None:  # (else nothing would take them off)
                sampler.drawn = []
            seq = job.seq if j == req.n - 1 else self.cache.fork(job.seq)
            sample = _Sample(self.tokenizer, sampler, req.prompt, req.stop, req.ignore_eos, req.max_tokens,
                             req.stop_ids, constraints[j])
            slot = _Slot(job, j, seq, sample)
            if self.n_draft and req.grammar is None:
                slot.drafter = LookupDrafter()
            job.slots.append(slot)
            job.n_running += 1
            self._running.append(slot)
        job.seq = None  # owned by the last slot now
        for slot in job.slots:
            self._sample(slot, logits, pushes)

    def _sample(self, slot: _Slot, logits: np.ndarray, pushes: dict) -> None:
        room = self.cache.seqs[slot.seq].n_past < self.n_ctx
        self._push(slot, slot.sample.next(logits, room), logits, pushes)

    def _draft(self, slot: _Slot) -> list[int]:
        """Tokens to check after the slot's pending one in this step's pass: as many as the context,
        the reply's max_tokens (drafts past it would be thrown away) and `lookup` allow."""
        if slot.drafter is None:
            return []
        sample = slot.sample
        k = min(self.n_draft, self.n_ctx - self.cache.seqs[slot.seq].n_past - 1, sample.max_tokens - sample.n_gen - 1)
        return slot.drafter.draft(sample.history, k)[:k] if k > 0 else []

    def _accept(self, slot: _Slot, rows: np.ndarray, pushes: dict) -> None:
        """A verify pass's rows (after the pending token and after each draft): the tokens the rule
        keeps (speculative.accept), each emitted as if sampled alone; the cache keeps the positions
        before the last one, which is fed at the next step."""
        n0 = self.cache.seqs[slot.seq].n_past - len(rows)  # the pending token's position
        tokens = accept(slot.sample.sampler, slot.sample.history, rows, slot.drafts)
        self.draft_tokens += len(slot.drafts)
        self.accepted_tokens += len(tokens) - 1
        for i, token in enumerate(tokens):
            self._push(slot, slot.sample.emit(token, room=n0 + 1 + i < self.n_ctx), rows[i], pushes)
            if slot.sample.finish_reason:
                break
        self.cache.truncate(n0 + 1 + i, slot.seq)

    def _push(self, slot: _Slot, chunk: Any, raw: np.ndarray, pushes: dict) -> None:
        """A sampled token's piece (its logprobs from the model's logits `raw`) for the slot's client;
        the token becomes the slot's pending one."""
        req = slot.job.req
        token = slot.sample.last_token
        piece = Piece(slot.index, chunk.text, chunk.token, chunk.finish_reason, sampled=token,
                      stop=slot.sample.stopper.matched if chunk.finish_reason else None)
        if req.logprobs is not None and req.post_sampling_probs:
            piece.logprob, piece.top = _drawn_logprobs(slot.sample.sampler, token, req.logprobs)
        elif req.logprobs is not None:
            piece.logprob, piece.top = _logprobs(raw, token, req.logprobs)
        self.tokens_generated += 1
        if self.metrics:
            self.metrics.generated()
        slot.pending = chunk.token
        pushes.setdefault(slot.job.handle, []).append(piece)

    def _end_slot(self, slot: _Slot, keep: bool) -> None:
        job = slot.job
        job.n_running -= 1
        if slot.seq in self.cache.seqs and slot.seq != job.seq:
            if keep:
                n = self.cache.seqs[slot.seq].n_past
                self._retain(slot.seq, (job.req.prompt + slot.sample.tokens)[:n])
            else:
                self.cache.remove(slot.seq)
        slot.seq = -1
        if job.n_running == 0:
            self._release(job)

    def _release(self, job: _Job) -> None:
        if not job.released:
            job.released = True
            self.slots_used -= job.req.n
            if self.metrics:
                self.metrics.finished()

    def _finish_job(self, job: _Job, error: Exception | None) -> None:
        """End a job early (cancelled: error None; failed: the error goes to its client)."""
        if job in self._prefilling:
            self._prefilling.remove(job)
        mine = [s for s in self._running if s.job is job]
        if mine:
            self._running = [s for s in self._running if s.job is not job]
            for s in mine:
                self._end_slot(s, keep=False)
        if job.seq is not None and job.seq in self.cache.seqs:  # still prefilling: it holds one sequence
            self.cache.remove(job.seq)
        job.seq = None
        self._release(job)
        if error is not None:
            job.handle._push(error)

    def _embed_step(self) -> None:
        ej = self._embeds[0]
        if not ej.started and not self._use_scales(self.lora_scales):  # (embeddings: the server's scales)
            return
        try:
            if not ej.started:
                ej.started = True
                self._dequeued()
            if ej.pooling is None and (len(ej.inputs[ej.index]) <= self.batch or ej.rank):
                end = group_end(ej.inputs, ej.index, self.batch)  # the next inputs that share a pass
                vectors = rank_many(self.model, self.cache, ej.inputs[ej.index:end], self.batch) if ej.rank else \
                    embed_many(self.model, self.cache, ej.inputs[ej.index:end], self.batch, self.pooling)
                ej.handle._push([(ej.index + k, v) for k, v in enumerate(vectors)])
                ej.index = end
                if ej.index == len(ej.inputs):
                    self._embeds.popleft()
                return
            if ej.pooling is None:  # a long input: a chunk a step
                ej.pooling = Pooling(self.model, self.cache, ej.inputs[ej.index], self.batch, self.pooling)
            vec = ej.pooling.step()
        except Exception as e:
            if not isinstance(e, PurelmError):  # (a request's own fault, an over-long input, is its answer)
                log.exception("embedding failed")
            self._embeds.popleft()
            if ej.pooling is not None:
                ej.pooling.close()
            ej.handle._push(e if isinstance(e, PurelmError) else GenerationError(f"embedding failed: {e}"))
            return
        if vec is None:
            return
        ej.handle._push([(ej.index, vec)])
        ej.index += 1
        ej.pooling = None
        if ej.index == len(ej.inputs):
            self._embeds.popleft()


def _deliver(items: list[tuple[Handle, list[Piece]]]) -> None:  # in the event loop
    for handle, pieces in items:
        handle.queue.put_nowait(pieces)


def _logprobs(logits: np.ndarray, token: int | None, k: int) -> tuple[float | None, list[tuple[int, float]]]:
    """log-softmax of the model's logits (before penalties, bias and temperature): the sampled
    token's value and the k likeliest tokens', likeliest first."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, len(x))
        ids = np.argpartition(-x, k - 1)[:k]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in ids]
    return (float(x[token] - lse) if token is not None else None), top


def _drawn_logprobs(sampler: Sampler, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log of the probability the sampler gave `token` after its whole chain (bias, penalties,
    filters, temperature), and of its k likeliest candidates with a probability above 0, as
    llama-server's `post_sampling_probs`."""
    ids, probs = sampler.drawn.pop(0) if sampler.drawn else (np.array([token]), np.array([1.0]))
    at = np.flatnonzero(ids == token)
    p = float(probs[at[0]]) if len(at) else 1.0  # (always there: the token was drawn from them; 1 as llama.cpp)
    top = [(int(i), math.log(float(q))) for i, q in zip(ids[:k], probs[:k]) if q > 0]
    return math.log(max(p, 5e-324)), top
