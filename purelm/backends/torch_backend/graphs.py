"""CUDA graphs: a decode step captured once per (cache, batch size, context bucket), and a prompt that
starts its sequence once per (cache, bucket of BLOCK tokens, logits asked for), when a second prompt of
that shape comes; replayed after.

A decode step of a small model is hundreds of small kernels whose launches cost more than their work,
and a prompt's launches cost more host time than its kernels take on the GPU. The pass's inputs (token
ids, positions, cache rows, block tables, lengths) live in static device tensors; a replay refills
them and runs the whole pass as one graph. The attention of a captured decode step reads a fixed
number of positions (the bucket, a multiple of BUCKET) and masks those past each sequence's length, so
one graph serves a sequence as it grows through the bucket. A prompt is padded to a multiple of BLOCK
tokens (prompt_inputs): the padding comes after every real token, so a causal pass computes the real
ones as it would alone, and the padding's keys and values go to the rest of the sequence's last block,
which no one reads before the sequence reaches those positions and writes them again.
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..kv_cache import BLOCK, PassView
from .cache import DeviceRuns, StagedView, TorchKVCache, decode_tables

BUCKET = 256  # positions: a multiple of BLOCK
MAX_GRAPHS = 32  # captured decode graphs kept (least recently used dropped)
MAX_BATCH = 64
MAX_PROMPT = 4096  # tokens: a longer prompt runs uncaptured (its launches are a small part of its time)
# captured prompt graphs kept, apart from the decode ones: every bucket up to MAX_PROMPT, since a bucket
# dropped and met again pays its capture again (~0.1 s, several uncaptured prompts' time); the graphs
# share one memory pool, so more of them cost little memory
MAX_PROMPT_GRAPHS = MAX_PROMPT // BLOCK


def is_prompt(view: PassView) -> bool:
    """One run that starts its sequence (position 0) and whose padded length fits MAX_PROMPT."""
    return len(view.runs) == 1 and view.runs[0].p0 == 0 and 1 < view.n_tokens and padded(view.n_tokens) <= MAX_PROMPT


def padded(n_tokens: int) -> int:
    """A prompt's length in its graph: the next multiple of BLOCK."""
    return -(-n_tokens // BLOCK) * BLOCK


def prompt_inputs(ids: np.ndarray, view: PassView, rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """A prompt's inputs padded to a multiple of BLOCK tokens. The padding's ids and positions are 0
    (in range for every model: learned position tables too); its keys and values are written to the
    rows of positions T.. of the sequence's last block, the sequence's own (reserved for position
    T-1 and, at position 0, copied from no one). `rows`: the hidden rows whose logits are wanted."""
    run, T = view.runs[0], view.n_tokens
    n = padded(T)
    pad = np.zeros(n - T, np.int64)
    return {"ids": np.concatenate([ids, pad]), "positions": np.concatenate([view.positions, pad]),
            "write": view.cache.rows(run.seq, 0, n), "rows": np.arange(T) if rows is None else rows}


def staged(host: dict[str, np.ndarray], cache: Any, device: torch.device) -> tuple[dict, DeviceRuns, StagedView]:
    """The pass's inputs as views of one device buffer (filled by one copy per replay), and the view
    of the cache that the captured attention reads them through."""
    arrays = {name: np.ascontiguousarray(v, np.int64) for name, v in host.items()}
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()])).to(device)
    static, at = {"flat": flat}, 0
    for name, a in arrays.items():
        static[name] = flat[at:at + a.size].view(a.shape)
        at += a.size
    if "lens" in static:  # a decode step: runs of one token, attended through their block tables
        meta = DeviceRuns(static["write"], static["tables"], static["lens"])
        return static, meta, StagedView(cache, meta, len(static["lens"]))
    n = len(static["write"])  # a prompt: one run of n tokens from position 0
    meta = DeviceRuns(static["write"], runs=[(0, n, 0, static["write"])])
    return static, meta, StagedView(cache, meta, n)


class GraphRunner:
    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.graphs: OrderedDict[tuple, dict] = OrderedDict()  # decode steps
        self.prompts: OrderedDict[tuple, dict] = OrderedDict()
        self.seen: set[tuple] = set()  # prompt shapes met once
        self.pool = None

    def eligible(self, view: PassView, rows: Any) -> bool:
        """Decode passes (every run one token, logits of every row), and prompts that start their
        sequence (is_prompt) from the second one of the same shape (bucket, logit rows) on: a capture
        costs several uncaptured prompts' time, so a one-off prompt (a single `generate`) runs
        uncaptured. A cache on this device."""
        if not isinstance(view.cache, TorchKVCache) or not view.runs:
            return False
        if rows is None and len(view.runs) <= MAX_BATCH and view.n_tokens == len(view.runs):
            return True
        if not is_prompt(view):
            return False
        shape = (id(view.cache), view.cache.generation, padded(view.n_tokens),
                 view.n_tokens if rows is None else len(rows))
        if shape in self.seen:
            return True
        if len(self.seen) >= 4096:
            self.seen.clear()
        self.seen.add(shape)
        return False

    def run(self, compute: Any, ids: np.ndarray, view: PassView, rows: Any = None) -> torch.Tensor:
        cache = view.cache
        owner = id(getattr(compute, "__self__", compute))
        if view.n_tokens == len(view.runs) and rows is None:
            B = len(view.runs)
            n_blocks = -(-max(r.p1 for r in view.runs) // BUCKET) * (BUCKET // BLOCK)
            key = (id(cache), cache.generation, B, n_blocks, owner)
            tables, lens = decode_tables(view, B, n_blocks)
            host = {"ids": ids, "positions": view.positions, "write": view.write_rows, "tables": tables, "lens": lens}
            graphs, limit = self.graphs, MAX_GRAPHS
        else:
            host = prompt_inputs(ids, view, rows)
            key = (id(cache), cache.generation, "prompt", len(host["ids"]), len(host["rows"]), owner)
            graphs, limit = self.prompts, MAX_PROMPT_GRAPHS
        entry = graphs.get(key)
        if entry is not None and entry["cache"]() is not cache:
            del graphs[key]  # a cache that died and whose id came back: not this graph's
            entry = None
        if entry is None:
            return self._capture(graphs, limit, key, compute, host, cache)
        graphs.move_to_end(key)
        # the pass's inputs in one copy from pinned memory (each small copy from pageable memory
        # costs microseconds of host time); the last pass's copy must be done before its buffer is
        # written again
        entry["copied"].synchronize()
        at = 0
        staging = entry["staging"].numpy()
        for value in host.values():
            flat = np.ravel(value)
            staging[at:at + flat.size] = flat
            at += flat.size
        entry["flat"].copy_(entry["staging"], non_blocking=True)
        entry["copied"].record()
        entry["graph"].replay()
        return entry["out"]

    def _capture(self, graphs: OrderedDict, limit: int, key: tuple, compute: Any, host: dict,
                 cache: TorchKVCache) -> torch.Tensor:
        static, meta, view = staged(host, cache, self.backend.device)

        def step() -> torch.Tensor:
            self.backend._scratch = {}  # values shared by layers are computed inside the graph
            meta.derive()
            return compute(static["ids"], static["positions"], view, static.get("rows"))

        # the first run, on a side stream as torch requires before a capture, is this pass's result
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = step().clone()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
        except Exception as e:  # an op that cannot be captured: run every pass eagerly from now on
            warnings.warn(f"purelm: CUDA graphs are off ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
            self.backend.graphs = None
            torch.cuda.synchronize()
            return result
        flat = static["flat"]
        graphs[key] = {"graph": graph, "out": out, "cache": weakref.ref(cache), "flat": flat,
                       "staging": torch.empty(flat.shape, dtype=torch.int64, pin_memory=True),
                       "copied": torch.cuda.Event()}
        while len(graphs) > limit:
            graphs.popitem(last=False)
        return result
