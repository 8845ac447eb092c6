"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p (llama.cpp's order)."""
from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from .errors import UsageError


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


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def apply_penalties(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.p
        if p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            return logits
        recent = history if p.repeat_last_n < 0 else history[len(history) - p.repeat_last_n :] if p.repeat_last_n else []
        counts = Counter(recent)
        if not counts:
            return logits
        logits = logits.copy()
        ids = np.fromiter(counts.keys(), np.int64)
        n = np.fromiter(counts.values(), np.float32)
        sel = logits[ids]
        sel = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        logits[ids] = sel - n * p.frequency_penalty - p.presence_penalty
        return logits

    def probabilities(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids and their probabilities after every filter (for tests and logprobs)."""
        p = self.p
        logits = self.apply_penalties(np.asarray(logits, np.float32), history)
        if p.temperature == 0:
            best = int(np.argmax(logits))
            return np.array([best]), np.array([1.0])
        if 0 < p.top_k < len(logits):
            ids = top_k_ids(logits, p.top_k)
        else:
            ids = np.arange(len(logits))
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        x = logits[ids].astype(np.float64)
        # top-p and min-p look at the untempered distribution; temperature comes last, as in llama.cpp.
        probs = np.exp(x - x[0])
        probs /= probs.sum()
        keep = len(ids)
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p) + 1))
        if p.min_p > 0.0:
            keep = min(keep, int(np.count_nonzero(probs >= p.min_p * probs[0])))
        ids, x = ids[:keep], x[:keep] / p.temperature
        probs = np.exp(x - x[0])
        return ids, probs / probs.sum()

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, probs = self.probabilities(logits, history)
        if len(ids) == 1:
            return int(ids[0])
        return int(ids[draw(self.rng, probs)])
