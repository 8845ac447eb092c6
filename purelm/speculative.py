"""Speculative decoding: a drafter guesses the next few tokens cheaply, one forward pass of the model
checks them all (the weights are read once for the lot), and the longest prefix the model agrees with
is kept, plus one token of the model's own.

Two drafters: prompt lookup (the last few tokens are searched in the prompt and the text so far, and
what followed them there is proposed, as llama.cpp's lookup and vLLM's "ngram" do) and a smaller model
sharing the vocabulary. Both draft deterministically, so the draft distribution is a point mass and the
rejection rule (Leviathan et al. 2023) reduces to: accept draft d with probability p(d); on a rejection
sample from p without d. The output then has the distribution of plain sampling, and for greedy it is
the same tokens: the drafts run as one short run of the sequence, whose logits the backend computes
bit for bit as it would one token at a time (Backend.short_run).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UsageError
from .sampling import Sampler, check_int, draw

LOOKUP_NGRAM_MAX = 3  # n-grams indexed: 2 and 3 tokens (a 1-token match is too weak to draft on)
LOOKUP_NGRAM_MIN = 2
LOOKUP_CANDIDATES = 8  # latest occurrences of the n-gram compared by how far back they match
LOOKUP_MATCH_MAX = 32  # tokens compared backwards at most
DRAFT_MAX = 8  # draft-model tokens per step at most
DRAFT_P_MIN = 0.5  # a draft model stops drafting at a token it gives less than this probability


def max_drafts(model: Any) -> int:
    """Draft tokens one verify pass can take with exact logits: the backend's short run, less the
    token sampled last (0 where the backend guarantees nothing for runs: no speculation there)."""
    return max(0, int(model.ops.short_run) - 1)


class LookupDrafter:
    """Prompt lookup: the history's last tokens are found earlier in it (an index of every 2- and
    3-gram's positions, kept up to date as the history grows, so a step does not scan the text); of
    the latest occurrences, the one matching furthest back wins, and what followed it is drafted.
    A match of m tokens drafts m - 1 of them at most: a verify row costs about a fifth of a decode
    step, and a short match is often the end of a copied span (on benchmarks/prompts/lookup this
    rule beat fixed draft lengths and longer or shorter ones)."""

    def __init__(self, n_max: int = LOOKUP_NGRAM_MAX, n_min: int = LOOKUP_NGRAM_MIN) -> None:
        self.n_min = check_int("n_min", n_min, 1)
        self.n_max = check_int("n_max", n_max, self.n_min, f">= n_min ({self.n_min})")
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions of the tokens after it
        self.seen: list[int] = []  # the history indexed so far

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        self._index(history)
        h, end = self.seen, len(self.seen)
        for n in range(min(self.n_max, end - 1), self.n_min - 1, -1):
            found = self.index.get(tuple(h[end - n:]))
            if not found:
                continue
            best, longest = 0, 0
            for at in reversed(found[-LOOKUP_CANDIDATES:]):
                m = n
                while m < LOOKUP_MATCH_MAX and at - m > 0 and h[at - m - 1] == h[end - m - 1]:
                    m += 1
                if m > longest:
                    best, longest = at, m
            return h[best:best + min(k, longest - 1)]
        return []

    def _index(self, history: Sequence[int]) -> None:
        n_old = len(self.seen)
        if history[:n_old] != self.seen:  # another text: start again
            self.index, self.seen, n_old = {}, [], 0
        self.seen.extend(history[n_old:])
        h = self.seen
        for end in range(max(n_old, 1), len(h)):  # the token at `end` follows the n-grams ending before it
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.index.setdefault(tuple(h[end - n:end]), []).append(end)


class ModelDrafter:
    """A smaller model sharing the target's vocabulary drafts greedily, in its own KV cache (the prefix
    it already holds is kept across steps, its rejected drafts dropped)."""

    def __init__(self, model: Any, cache: Any, p_min: float = DRAFT_P_MIN) -> None:
        self.model, self.cache, self.p_min = model, cache, p_min

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        from .generate import prefill

        cache = self.cache
        room = cache.n_ctx - len(history)
        k = min(k, room)
        if k <= 0:
            return []
        keep = 0
        held = cache.tokens
        while keep < min(len(held), len(history) - 1) and held[keep] == history[keep]:
            keep += 1
        cache.truncate(keep)
        logits = prefill(self.model, cache, list(history[keep:]))
        cache.tokens = list(history)
        drafts: list[int] = []
        while True:
            token = int(np.argmax(logits))
            if drafts and _probability(logits, token) < self.p_min:
                break  # an unsure guess costs a verify row and is likely rejected
            drafts.append(token)
            if len(drafts) == k:
                break
            logits = self.model.forward(np.array([token]), cache)
            cache.tokens.append(token)
        return drafts


def _probability(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    return float(1.0 / np.exp(x - x[token]).sum())


def check_draft_vocabulary(target_tokenizer: Any, draft_tokenizer: Any, draft_path: str) -> None:
    """A draft model must number its tokens as the target does, else its drafts mean other tokens."""
    if list(draft_tokenizer.tokens) != list(target_tokenizer.tokens):
        raise UsageError(f"the draft model {draft_path} does not share the model's vocabulary "
                         f"({draft_tokenizer.vocab_size} tokens against {target_tokenizer.vocab_size}, or "
                         "the same count with other tokens): speculative decoding needs the same one")


def accept(sampler: Sampler, history: Sequence[int], rows: np.ndarray, drafts: Sequence[int]) -> list[int]:
    """The tokens one verify pass yields: `rows` are the logits after the last sampled token and after
    each draft (len(drafts) + 1 rows). Drafts are kept while the rule accepts them; then one token is
    sampled, the correction of a rejected draft or, all accepted, the token after the last."""
    out: list[int] = []
    hist = list(history)
    for i, row in enumerate(rows):
        ids, probs = sampler.probabilities(row, hist)
        if i == len(drafts):
            out.append(int(ids[0]) if len(ids) == 1 else int(ids[draw(sampler.rng, probs)]))
            sampler.chosen(out[-1], ids, probs)
            return out
        d = int(drafts[i])
        if len(ids) == 1:  # greedy (or one candidate left): accept exactly the model's token
            token = int(ids[0])
        else:
            p_d = float(probs[ids == d].sum())
            if p_d > 0 and sampler.rng.random() < p_d:
                token = d
            else:  # the residual max(0, p - q) with q a point mass on d: p without d, renormalized
                rest = np.where(ids == d, 0.0, probs)
                token = int(ids[draw(sampler.rng, rest / rest.sum())])
        out.append(token)
        sampler.chosen(token, ids, probs)  # (Mirostat's next row is read at the mu this token leaves)
        if token != d:
            return out
        hist.append(token)
    raise UsageError(f"accept: {len(rows)} rows of logits for {len(drafts)} drafts (need one more)")
