"""Prometheus metrics of `purelm serve` (GET /metrics), in a registry of the server's own."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

WINDOW_S = 10.0  # the tokens/s gauge: over the last this many seconds


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("purelm_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("purelm_prompt_tokens", "Prompt tokens evaluated (a reused cached "
                                     "prefix not counted)", registry=r)
        self.prompt_tokens_reused = Counter("purelm_prompt_tokens_reused",
                                            "Prompt tokens taken from a cached prefix", registry=r)
        self.generated_tokens = Counter("purelm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("purelm_time_to_first_token_seconds", "From a request's arrival in the queue to "
                              "its first generated token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, float("inf")))
        self.duration = Histogram("purelm_request_duration_seconds", "Generation requests, arrival to last byte",
                                  registry=r, buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")))
        self.queue = Gauge("purelm_requests_waiting", "Requests waiting for a slot", registry=r)
        self.slots_used = Gauge("purelm_slots_used", "Slots (sequences being generated) in use", registry=r)
        self.slots_total = Gauge("purelm_slots_total", "Slots (--parallel)", registry=r)
        self.running = Gauge("purelm_requests_running", "Requests admitted and not finished", registry=r)
        self.tokens_per_second = Gauge("purelm_tokens_per_second", f"Tokens generated per second over the last "
                                       f"{WINDOW_S:.0f} s, all requests together", registry=r)
        self.draft_tokens = Gauge("purelm_draft_tokens", "Tokens drafted by prompt lookup (--lookup) and checked, "
                                  "since the start", registry=r)
        self.accepted_tokens = Gauge("purelm_draft_tokens_accepted", "Drafted tokens the model agreed with, since "
                                     "the start", registry=r)
        self._running = 0
        self._recent: deque[float] = deque()  # times of recent generated tokens
        self._lock = threading.Lock()
        self.running.set_function(lambda: self._running)
        self.tokens_per_second.set_function(self._rate)

    def bind(self, engine: Any) -> None:
        self.queue.set_function(lambda: engine.n_waiting)
        self.slots_used.set_function(lambda: engine.slots_used)
        self.slots_total.set(engine.parallel)
        self.draft_tokens.set_function(lambda: engine.draft_tokens)
        self.accepted_tokens.set_function(lambda: engine.accepted_tokens)

    # called from the engine thread
    def admitted(self, reused: int) -> None:
        self._running += 1
        if reused:
            self.prompt_tokens_reused.inc(reused)

    def finished(self) -> None:
        self._running -= 1

    def generated(self, n: int = 1) -> None:
        self.generated_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.extend([now] * n)
            while self._recent and self._recent[0] < now - WINDOW_S:
                self._recent.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - WINDOW_S:
                self._recent.popleft()
            return len(self._recent) / WINDOW_S

    def text(self) -> bytes:
        return generate_latest(self.registry)
