"""Turning logits into the next token, as llama.cpp's default sampler chain does: penalties, DRY,
top-n-sigma, top-k, typical-p, top-p, min-p, XTC, temperature; or Mirostat (1 or 2), which takes the place
of them all."""
from __future__ import annotations

import math
import numbers
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import GenerationError, UsageError


def check_int(name: str, value: object, lo: int, rule: str = "") -> int:
    """`value` as an int if it is a whole number (bools are not) >= lo, else a UsageError naming `name`."""
    rule = rule or f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be a whole number ({rule}), got {value!r}")
    if value < lo:
        raise UsageError(f"{name} must be {rule}, got {value}")
    return int(value)


def check_float(name: str, value: object, rule: str = "a finite number",
                ok: Callable[[float], bool] = lambda v: True) -> float:
    """`value` as a float if it is a finite real number (bools are not) that passes `ok`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number ({rule}), got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an integer past float's range (Python's have any number of digits)
        raise UsageError(f"{name} must be {rule}, got an integer beyond a float's range") from None
    if not (math.isfinite(v) and ok(v)):
        raise UsageError(f"{name} must be {rule}, got {value!r}")
    return v


PREFILTER_ROWS = 128  # top_k_ids' prefilter: the logits as 128 rows


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits (0 < k < len), ascending; of tied logits at the cut, the lowest
    ids. Over a large vocabulary, first a lower bound of the k-th largest: the logits as 128 rows of
    n // 128, the k-th largest of the columns' maxima (k columns hold a value at least that large), so
    that the exact selection runs over the few hundred logits that reach it, not all 49k (the
    sampler's largest cost)."""
    n_cols = len(logits) // PREFILTER_ROWS
    if n_cols >= 4 * k:
        maxima = logits[:n_cols * PREFILTER_ROWS].reshape(PREFILTER_ROWS, n_cols).max(0)
        if not np.isnan(maxima).any():  # a column's NaN hides its maximum: the full selection decides
            candidates = np.flatnonzero(logits >= np.partition(maxima, n_cols - k)[n_cols - k])
            return candidates[_top_k_ids(logits[candidates], k)] if len(candidates) > k else candidates
    return _top_k_ids(logits, k)


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """top_k_ids without the prefilter: the k-th largest value by a partition of the values, then one
    pass (half the time of argpartition, measured)."""
    cut = np.partition(logits, len(logits) - k)[len(logits) - k]
    ids = np.flatnonzero(logits > cut)
    if len(ids) < k:
        ids = np.sort(np.concatenate([ids, np.flatnonzero(logits == cut)[:k - len(ids)]]))
    if len(ids) == k:
        return ids
    return np.sort(np.argsort(-logits, kind="stable")[:k])  # NaNs: the partition counts them largest, a sort last


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """An index drawn with probabilities `probs`: the same draw as rng.choice(len(probs), p=probs)
    (its cumulative sum and one uniform number; tests check it) without choice's checks of p."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default
MAX_BREAKERS, MAX_BREAKER_BYTES = 16, 40  # (llama.cpp cuts a breaker at 40 bytes)


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.0  # 1 disables; llama.cpp divides positive logits, multiplies negative
    repeat_last_n: int = 64  # how many recent tokens the penalties look at (-1: all)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    top_n_sigma: float = -1.0  # <= 0 disables; keeps the logits within n standard deviations of the largest
    typical_p: float = 1.0  # 1 disables; locally typical sampling
    xtc_probability: float = 0.0  # 0 disables; how often XTC removes the likeliest tokens ("exclude top choices")
    xtc_threshold: float = 0.1  # XTC removes those of probability >= this, but the least likely of them; > 0.5 disables
    mirostat: int = 0  # 0 off, 1 or 2: Mirostat's version, in place of penalties and every filter (as llama.cpp)
    mirostat_tau: float = 5.0  # Mirostat's target surprise, in bits
    mirostat_eta: float = 0.1  # Mirostat's learning rate
    dry_multiplier: float = 0.0  # 0 disables DRY ("don't repeat yourself"): a token that would extend a
    dry_base: float = 1.75  # repeat of n >= dry_allowed_length tokens loses multiplier * base^(n - allowed)
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64  # how many recent tokens DRY looks at; 0 disables
    dry_sequence_breakers: Sequence[str] = DRY_BREAKERS  # texts no repeat runs across (needs a tokenizer)
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit first (-inf: never)

    def uses_dry(self) -> bool:
        """Whether DRY runs (Mirostat's chain has none)."""
        return self.dry_multiplier != 0 and self.dry_penalty_last_n != 0 and not self.mirostat

    def check_bias_ids(self, n_vocab: int, name: str = "logit_bias") -> None:
        """A UsageError for a logit_bias token outside a vocabulary of n_vocab tokens."""
        outside = [k for k in self.logit_bias or () if k >= n_vocab]
        if outside:
            raise UsageError(f"{name}: token {outside[0]} is outside the vocabulary (0 to {n_vocab - 1})")

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise UsageError for a value of the wrong type or out of range. `names`: how to call each
        field in the message (the command line passes its flags)."""
        n = {f.name: f.name for f in fields(self)} | dict(names or {})
        check_float(n["temperature"], self.temperature, ">= 0; 0 is greedy", lambda v: v >= 0)
        check_int(n["top_k"], self.top_k, 0, ">= 0; 0 keeps every token")
        check_float(n["top_p"], self.top_p, "between 0 and 1", lambda v: 0 <= v <= 1)
        check_float(n["min_p"], self.min_p, "between 0 and 1", lambda v: 0 <= v <= 1)
        check_float(n["repeat_penalty"], self.repeat_penalty, "> 0; 1 is off", lambda v: v > 0)
        check_int(n["repeat_last_n"], self.repeat_last_n, -1, ">= -1; -1 looks at every token")
        check_float(n["frequency_penalty"], self.frequency_penalty)
        check_float(n["presence_penalty"], self.presence_penalty)
        if self.seed is not None:
            check_int(n["seed"], self.seed, 0, ">= 0, or None for a random seed")
        check_float(n["top_n_sigma"], self.top_n_sigma, "a finite number; <= 0 is off")
        check_float(n["typical_p"], self.typical_p, "between 0 and 1; 1 is off", lambda v: 0 <= v <= 1)
        check_float(n["xtc_probability"], self.xtc_probability, "between 0 and 1; 0 is off", lambda v: 0 <= v <= 1)
        check_float(n["xtc_threshold"], self.xtc_threshold, "between 0 and 1; above 0.5 is off", lambda v: 0 <= v <= 1)
        if check_int(n["mirostat"], self.mirostat, 0, "0, 1 or 2") > 2:
            raise UsageError(f"{n['mirostat']} must be 0 (off), 1 or 2 (Mirostat's version), got {self.mirostat}")
        check_float(n["mirostat_tau"], self.mirostat_tau, ">= 0", lambda v: v >= 0)
        check_float(n["mirostat_eta"], self.mirostat_eta, ">= 0", lambda v: v >= 0)
        check_float(n["dry_multiplier"], self.dry_multiplier, ">= 0; 0 is off", lambda v: v >= 0)
        check_float(n["dry_base"], self.dry_base, ">= 1", lambda v: v >= 1)
        check_int(n["dry_allowed_length"], self.dry_allowed_length, 0)
        check_int(n["dry_penalty_last_n"], self.dry_penalty_last_n, 0, ">= 0; 0 is off")
        bias = self.logit_bias
        if bias is not None and (not isinstance(bias, Mapping) or not all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool) and 0 <= k < 2**31
                and isinstance(v, numbers.Real) and not isinstance(v, bool) and (abs(v) <= 1e30 or v == -math.inf)
                for k, v in bias.items())):
            raise UsageError(f"{n['logit_bias']} must map token ids (>= 0) to numbers (at most 1e30 in size, or -inf "
                             f"to ban a token), got {bias!r:.200}")
        b = self.dry_sequence_breakers
        if isinstance(b, str) or not isinstance(b, Sequence) or len(b) > MAX_BREAKERS or not all(
                isinstance(t, str) and 0 < len(t.encode("utf-8", "replace")) <= MAX_BREAKER_BYTES
                and not any("\ud800" <= c <= "\udfff" for c in t) for t in b):
            raise UsageError(f"{n['dry_sequence_breakers']} must be a list of at most {MAX_BREAKERS} strings of 1 to "
                             f"{MAX_BREAKER_BYTES} bytes of UTF-8, got {b!r:.200}")


class Sampler:
    """One sequence's sampler: its parameters, its random generator and, with Mirostat, its running
    target (mu)."""

    def __init__(self, params: SamplingParams, tokenizer: Any = None) -> None:
        """`tokenizer`: the model's, where DRY's sequence breakers (texts) are to be found among its
        tokens; without one DRY runs without breakers."""
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.mu = 2.0 * params.mirostat_tau  # Mirostat's maximum surprise, moved after each token
        self.breakers: dict[int, list[tuple[int, ...]]] = {}
        # a list: chosen() appends each token's candidates and probabilities to it (the server's
        # post-sampling probabilities); None keeps nothing
        self.drawn: list[tuple[np.ndarray, np.ndarray]] | None = None
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter((int(k) for k in bias), np.int64, len(bias))
        self._bias = np.fromiter((float(v) for v in bias.values()), np.float64, len(bias))
        if params.uses_dry() and tokenizer is not None and params.dry_sequence_breakers:
            self.breakers = dry_breakers(tokenizer, tuple(params.dry_sequence_breakers))

    def apply_penalties(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.p
        if p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            return logits
        n_last = len(history) if p.repeat_last_n < 0 else p.repeat_last_n
        recent = history[max(0, len(history) - n_last):] if n_last else []
        counts = Counter(recent)
        if not counts:
            return logits
        logits = logits.copy()
        ids = np.fromiter(counts.keys(), np.int64)
        n = np.fromiter(counts.values(), np.float32)
        sel = logits[ids].astype(np.float64)
        with np.errstate(all="ignore"):
            new = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty) - n * p.frequency_penalty \
                - p.presence_penalty
        logits[ids] = _within_float32(new, sel)
        return logits

    def apply_dry(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """DRY (llama.cpp's port of koboldcpp's): over the last dry_penalty_last_n tokens, each token
        that would extend a repeat of the text's end at least dry_allowed_length long loses
        multiplier * base^(length - allowed); a repeat never reaches back past the last sequence breaker,
        and a breaker of one token is never penalized."""
        p = self.p
        last = list(history[max(0, len(history) - p.dry_penalty_last_n):])
        n = len(last)
        if n <= p.dry_allowed_length:
            return logits
        limit = n  # the repeats' longest: up to the last breaker
        for i in range(n):  # i tokens back from the end
            tails = self.breakers.get(last[n - 1 - i])
            if tails is None:
                continue
            longest = max((len(t) for t in tails if len(t) <= i and list(t) == last[n - i:n - i + len(t)]),
                          default=-1)
            if longest >= 0:
                limit = i - longest
                break
        if limit < p.dry_allowed_length:
            return logits
        z = _z_array(last[::-1])  # z[k]: how many tokens before n - k match the text's end
        longest_after: dict[int, int] = {}
        for k in range(1, n):
            length = min(z[k], limit)
            if length >= p.dry_allowed_length and longest_after.get(last[n - k], -1) < length:
                longest_after[last[n - k]] = length
        max_exponent = int(88.7228391 / math.log(p.dry_base)) if p.dry_base > 1.000001 else 0  # float32's range
        logits = logits.copy()
        for token, length in longest_after.items():
            if () not in self.breakers.get(token, ()):
                e = length - p.dry_allowed_length
                penalty = p.dry_multiplier * p.dry_base ** (min(e, max_exponent) if max_exponent else e)
                logits[token] = _within_float32(np.float64(logits[token]) - penalty, logits[token])
        return logits

    def probabilities(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids, likeliest first, and their probabilities after every filter (what a token is
        drawn from; speculative decoding and tests read it). XTC draws from the sampler's generator."""
        p = self.p
        logits = np.asarray(logits, np.float32)
        if len(self._bias):
            if self._bias_ids.max() >= len(logits):
                raise UsageError(f"logit_bias names token {int(self._bias_ids.max())}, outside the vocabulary "
                                 f"({len(logits)} tokens)")
            logits = logits.copy()
            logits[self._bias_ids] = np.where(  # -inf bans; other sums stay within float32
                self._bias == -np.inf, -np.inf,
                _within_float32(logits[self._bias_ids].astype(np.float64) + self._bias, logits[self._bias_ids]))
        if not np.isfinite(logits.max()):
            raise GenerationError("no token is left to sample: the grammar and logit_bias exclude every one"
                                  if logits.max() == -np.inf else "the logits are not finite numbers")
        if p.mirostat:
            return greedy(logits) if p.temperature == 0 else self._mirostat(logits)
        logits = self.apply_penalties(logits, history)
        if p.uses_dry():
            logits = self.apply_dry(logits, history)
        xtc = p.xtc_probability > 0 and p.xtc_threshold <= 0.5
        if p.temperature == 0 and p.top_n_sigma <= 0 and p.typical_p >= 1 and not xtc:
            return greedy(logits)  # (top-k, top-p and min-p always keep the likeliest token)
        if p.top_n_sigma > 0:
            logits = _top_n_sigma(logits, p.top_n_sigma)
        if 0 < p.top_k < len(logits):
            ids = top_k_ids(logits, p.top_k)
        else:
            ids = np.arange(len(logits))
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        x = logits[ids].astype(np.float64)
        # every filter looks at the untempered distribution of the tokens still in; temperature comes last
        probs = _softmax(x)
        if p.typical_p < 1.0:
            keep = np.sort(_typical(probs, p.typical_p))  # positions in ids: still likeliest first
            ids, x = ids[keep], x[keep]
            probs = _softmax(x)
        keep = len(ids)
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p) + 1))
        if p.min_p > 0.0:
            keep = min(keep, int(np.count_nonzero(probs >= p.min_p * probs[0])))
        keep = max(1, min(keep, int(np.count_nonzero(probs))))  # tokens masked to -inf are never candidates
        ids, x = ids[:keep], x[:keep]
        if xtc and len(ids) >= 2 and self.rng.random() <= p.xtc_probability:
            # all the tokens at least as likely as the threshold but the least likely of them go
            over = int(np.count_nonzero(_softmax(x) >= p.xtc_threshold))
            if over > 1:
                ids, x = ids[over - 1:], x[over - 1:]
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            scaled = x / p.temperature
        if p.temperature == 0 or np.isinf(scaled[0]):  # the likeliest of the tokens the filters left (as
            return ids[:1], np.array([1.0])            # llama.cpp's temperature 0; or one so near 0 it overflowed)
        return ids, _softmax(scaled)

    def _mirostat(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mirostat's candidates at the current mu (version 1: the top k of a Zipf estimate over the 100
        likeliest tokens; version 2: the tokens of surprise at most mu), after temperature."""
        p = self.p
        with np.errstate(over="ignore"):
            x = logits.astype(np.float64) / p.temperature
        if np.isinf(x.max()):  # a temperature so near 0 that the logits overflowed: the likeliest
            return greedy(logits)
        n = len(x)
        if p.mirostat == 1:
            k = self.mirostat_k(x)
            k = int(min(k, n)) if math.isfinite(k) else n if k > 0 else 1  # (NaN: 1)
            ids = top_k_ids(x, max(1, k)) if 1 < k < n else np.arange(n) if k >= n else np.array([np.argmax(x)])
        else:
            log_p = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            ids = np.flatnonzero(-log_p / math.log(2) <= self.mu)
            if len(ids) == 0:
                ids = np.array([np.argmax(x)])
        ids = ids[np.argsort(-x[ids], kind="stable")]
        return ids, _softmax(x[ids])

    def mirostat_k(self, x: np.ndarray) -> float:
        """Mirostat 1's k at the current mu for tempered logits x: from the Zipf exponent (s_hat) the
        100 likeliest tokens fit. (Where k passes 2^31, llama.cpp's int32 of it overflows and it keeps
        one token; here k over the vocabulary keeps them all.)"""
        top = top_k_ids(x, min(100, len(x)))
        top = top[np.argsort(-x[top], kind="stable")]
        top = top[np.isfinite(x[top])]
        b = x[top[:-1]] - x[top[1:]]  # log(p_i / p_i+1)
        t = np.log(np.arange(2, len(top) + 1) / np.arange(1, len(top)))
        with np.errstate(all="ignore"):
            s_hat = np.float64((t * b).sum()) / (t * t).sum()  # numpy scalars: inf and NaN, no exceptions
            eps = s_hat - 1
            return float(np.power((eps * np.exp2(self.mu)) / (1 - np.power(np.float64(len(x)), -eps)), 1 / s_hat))

    def chosen(self, token: int, ids: np.ndarray, probs: np.ndarray) -> None:
        """The sequence goes on with `token`, drawn from (ids, probs): Mirostat moves mu by the gap
        between the token's surprise and its target."""
        if self.drawn is not None:
            self.drawn.append((ids, probs))
        if self.p.mirostat and self.p.temperature > 0:
            at = np.flatnonzero(ids == token)
            if len(at):
                surprise = -math.log2(max(float(probs[at[0]]), 1e-300))
                self.mu -= self.p.mirostat_eta * (surprise - self.p.mirostat_tau)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, probs = self.probabilities(logits, history)
        token = int(ids[0]) if len(ids) == 1 else int(ids[draw(self.rng, probs)])
        self.chosen(token, ids, probs)
        return token


def _within_float32(new: Any, old: Any) -> Any:
    """Penalized logits kept finite where they were (a huge penalty must not leave only -inf or NaN to
    draw from); -inf (a grammar's mask) stays."""
    big = np.finfo(np.float32).max
    return np.where(np.isfinite(old), np.clip(np.nan_to_num(new, nan=-big), -big, big), old).astype(np.float32)


def _z_array(s: Sequence[int]) -> list[int]:
    """z[k]: the length of the longest common prefix of s and s[k:] (z[0] = 0), in linear time."""
    n = len(s)
    z, left, right = [0] * n, 0, 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


_breakers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {breakers: heads}
_breakers_lock = threading.Lock()
MAX_TAIL = 20  # tokens of a breaker after its first (llama.cpp's bound on the scan)
MAX_BREAKER_SETS = 8


def dry_breakers(tokenizer: Any, texts: tuple[str, ...]) -> dict[int, list[tuple[int, ...]]]:
    """DRY's sequence breakers as tokens, found as llama.cpp finds them: each token whose text holds a
    breaker is one with nothing after it (()); a token whose text ends with the start of a breaker is
    one followed by the tokens of the breaker's rest. A token's text is llama.cpp's detokenization of
    it alone (a SentencePiece vocabulary's leading space dropped). A rest that starts inside a character
    of several bytes is tokenized with a U+FFFD for each stray byte: the tokens llama.cpp's byte-level
    BPE gives it; its SentencePiece tokenizer gives byte tokens there instead (both after the "▁" it
    prefixes, which text seldom has next). Built once per tokenizer and
    breakers (the last few sets kept), the vocabulary scanned outside the lock."""
    with _breakers_lock:
        known = _breakers.setdefault(tokenizer, {})
        if texts in known:
            known[texts] = known.pop(texts)  # the most recently used last
            return known[texts]
    strip = getattr(tokenizer, "model", None) == "llama" and getattr(tokenizer, "add_space_prefix", False)
    pieces = [tokenizer.token_to_piece(i) for i in range(tokenizer.vocab_size)]
    if strip:
        pieces = [w[1:] if w.startswith(b" ") else w for w in pieces]
    heads: dict[int, list[tuple[int, ...]]] = {}
    for text in texts:
        b = text.encode("utf-8")
        rests = {j: tuple(tokenizer.encode(b[j:].decode("utf-8", "replace"), add_special=False,
                                           parse_special=False)[:MAX_TAIL]) for j in range(1, len(b))}
        starts = tuple(b[:j] for j in rests)
        for token, word in enumerate(pieces):
            if b in word:
                tails = [()]
            elif starts and word.endswith(starts):
                tails = [rests[j] for j in rests if j <= len(word) and word.endswith(b[:j])]
            else:
                continue
            for tail in tails:
                if tail not in heads.setdefault(token, []):
                    heads[token].append(tail)
    with _breakers_lock:
        known = _breakers.setdefault(tokenizer, {})
        while len(known) >= MAX_BREAKER_SETS:  # requests may each bring their own: keep the few used last
            known.pop(next(iter(known)))
        known[texts] = heads
    return heads


def greedy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([int(np.argmax(logits))]), np.array([1.0])


def _softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities of float64 logits, at least one of them finite."""
    probs = np.exp(x - x.max())
    return probs / probs.sum()


def _top_n_sigma(logits: np.ndarray, n: float) -> np.ndarray:
    """Logits below the largest minus n standard deviations of the finite ones set to -inf."""
    finite = logits[np.isfinite(logits)]
    if len(finite) <= 1:
        return logits
    x = finite.astype(np.float64)
    return np.where(logits < x.max() - n * x.std(), np.float32(-np.inf), logits)


def _typical(probs: np.ndarray, mass: float) -> np.ndarray:
    """Locally typical sampling: positions of the tokens whose surprise is closest to the entropy,
    closest first, until their probabilities sum to more than `mass` (at least one)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        surprise = -np.log(probs)
        entropy = float(np.nansum(probs * np.where(probs > 0, surprise, 0.0)))
    order = np.argsort(np.abs(surprise - entropy), kind="stable")
    return order[:min(len(order), int(np.searchsorted(np.cumsum(probs[order]), mass, side="right")) + 1)]
