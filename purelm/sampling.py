"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p (llama.cpp's order)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8  # <= 0 means greedy
    top_k: int = 40  # <= 0 disables
    top_p: float = 0.95  # >= 1 disables
    min_p: float = 0.05  # <= 0 disables
    repeat_penalty: float = 1.0  # 1 disables; llama.cpp divides positive logits, multiplies negative
    repeat_last_n: int = 64  # how many recent tokens the penalties look at (-1: all)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        if not np.isfinite(self.temperature):
            raise ValueError("temperature must be a finite number")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be between 0 and 1")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be between 0 and 1")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be positive")


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
        if p.temperature <= 0:
            best = int(np.argmax(logits))
            return np.array([best]), np.array([1.0])
        ids = np.arange(len(logits))
        if 0 < p.top_k < len(logits):
            ids = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
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
        return int(ids[self.rng.choice(len(ids), p=probs)])
