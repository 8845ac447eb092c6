"""A Ray Serve request router that sends a request to the replica whose KV cache already holds the
start of its prompt, else to the least loaded replica.

purelm's engine keeps each finished request's sequence and forks it for a later prompt that starts
with the same tokens (a system prompt, the earlier turns of a chat), evaluating only the rest. That
saving exists only on the replica that served the earlier request, so the router remembers, per
replica, which prompt starts it has sent there and prefers the replica with the longest match.

The router runs inside whoever holds the deployment's handle (purelm's ingress replica). It sees the
request's JSON body (the ingress reads it before routing; Serve's HTTP proxy alone would only pass
the headers), and keys prompts by text, not tokens: chained hashes of BLOCK-character blocks of the
messages (role and content) or of the prompt. It is a hint, never a correctness matter: any replica
gives the same reply."""
from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger("purelm.ray")

BLOCK = 32  # characters per hashed block
MIN_BLOCKS = 2  # a shared start shorter than this many blocks (~16 tokens, the engine's MIN_PREFIX) is ignored
MAX_BLOCKS = 1 << 16  # blocks remembered per replica (least recently used dropped first)
MAX_PENDING = 4096  # requests whose hashes wait for their routing (a cancelled one never comes)


def prompt_text(body: Any) -> str | None:
    """The text a request's prompt starts with, from its JSON body: the chat messages (role and
    content, in order) or the completion prompt (the first one; token ids as text). None when the
    body has neither (embeddings, /v1/models, a malformed body)."""
    if not isinstance(body, dict):
        return None
    msgs = body.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if not isinstance(m, dict):
                return None
            parts.append(f"{m.get('role')}\x1f{_content(m.get('content'))}\x1e")
        return "".join(parts)
    p = body.get("prompt")
    if isinstance(p, list) and p and not all(isinstance(t, int) for t in p):
        p = p[0]  # several prompts: route by the first
    if isinstance(p, str):
        return p
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return "".join(f"{t}," for t in p)
    return None


def _content(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts
        return "".join(x.get("text", "") if isinstance(x, dict) and isinstance(x.get("text"), str) else ""
                       for x in c)
    return ""


def block_hashes(text: str) -> list[int]:
    """Chained hashes of the text's whole BLOCK-character blocks: equal lists up to k mean equal
    first k * BLOCK characters."""
    out, h = [], 0
    for i in range(0, len(text) - BLOCK + 1, BLOCK):
        h = hash((h, text[i:i + BLOCK]))
        out.append(h)
    return out


def request_text(pending: PendingRequest) -> str | None:
    """The prompt text of a request the ingress forwards: args[0] is {"method", "path", ..., "body"}."""
    if not pending.args or not isinstance(pending.args[0], dict):
        return None
    body = pending.args[0].get("body")
    if not isinstance(body, (bytes, bytearray)) or not body:
        return None
    try:
        return prompt_text(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # the replica answers it with a 400


class PrefixTable:
    """Per replica, the prompt-start blocks recently sent there (an LRU of chained block hashes)."""

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self.blocks: dict[Any, OrderedDict[int, None]] = {}

    def match(self, hashes: list[int], replica: Any) -> int:
        """How many leading blocks of `hashes` the replica has seen."""
        seen = self.blocks.get(replica)
        n = 0
        if seen:
            for h in hashes:
                if h not in seen:
                    break
                n += 1
        return n

    def add(self, hashes: list[int], replica: Any) -> None:
        seen = self.blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def drop(self, replica: Any) -> None:
        self.blocks.pop(replica, None)


class PrefixRouter(RequestRouter):
    """Prefix affinity first, least loaded otherwise (see the module's docstring).

    Each request is routed for itself (no FIFO hand-over: a replica chosen for its prefix goes to
    that request). Ranks returned to Serve: [the replicas with the longest matching prefix], then [all
    the others]; Serve takes the lowest queue among a rank's replicas that accept, and goes to the next
    rank when all of them are full. Affinity yields to load when the preferred replica's queue is
    `imbalance` requests longer than the shortest known queue."""

    def initialize_state(self, imbalance: int = 8, min_blocks: int = MIN_BLOCKS, max_blocks: int = MAX_BLOCKS) -> None:
        self.imbalance, self.min_blocks = imbalance, min_blocks
        self.table = PrefixTable(max_blocks)
        self._hashes: OrderedDict[str, list[int]] = OrderedDict()  # request id -> block hashes, until routed

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = self._request_hashes(pending_request)
        if hashes:
            scores = [(self.table.match(hashes, r.replica_id), r) for r in candidate_replicas]
            best = max(s for s, _ in scores)
            if best >= self.min_blocks:
                preferred = [r for s, r in scores if s == best]
                if not self._overloaded(preferred, candidate_replicas):
                    others = [r for s, r in scores if s != best]
                    return [preferred, others] if others else [preferred]
        # Serve takes the shortest queue, the first one on a tie: shuffled, idle replicas share the work
        return [random.sample(candidate_replicas, len(candidate_replicas))]

    def _request_hashes(self, pending: PendingRequest | None) -> list[int]:
        if pending is None:
            return []
        rid = pending.metadata.internal_request_id
        if rid not in self._hashes:
            text = request_text(pending)
            self._hashes[rid] = block_hashes(text) if text else []
            while len(self._hashes) > MAX_PENDING:
                self._hashes.popitem(last=False)
        return self._hashes[rid]

    def _overloaded(self, preferred: list[RunningReplica], candidates: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        known = {r.replica_id: cache.get(r.replica_id) for r in candidates}
        lengths = [q for q in known.values() if q is not None]
        if not lengths:
            return False
        mine = [known[r.replica_id] for r in preferred if known[r.replica_id] is not None]
        return bool(mine) and min(mine) - min(lengths) >= self.imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self.table.add(hashes, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.drop(replica_id)  # its cache died with it

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in [k for k in self.table.blocks if k not in live]:
            self.table.drop(rid)
