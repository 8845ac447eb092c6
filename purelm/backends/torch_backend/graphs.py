"""CUDA graphs for the decode step: captured once per (cache, batch size, context bucket), replayed after.

A decode step of a small model is hundreds of small kernels whose launches cost more than their work.
The step's inputs (token ids, positions, cache rows, block tables, lengths) live in static device
tensors; a replay refills them and runs the whole step as one graph. The attention of a captured step
reads a fixed number of positions (the bucket, a multiple of BUCKET) and masks those past each
sequence's length, so one graph serves a sequence as it grows through the bucket.
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
MAX_GRAPHS = 32  # captured graphs kept (least recently used dropped)
MAX_BATCH = 64


class GraphRunner:
    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.graphs: OrderedDict[tuple, dict] = OrderedDict()
        self.pool = None

    def eligible(self, view: PassView, rows: Any) -> bool:
        """Decode passes only: every run one token, logits of every row, a cache on this device."""
        return (rows is None and isinstance(view.cache, TorchKVCache) and 0 < len(view.runs) <= MAX_BATCH
                and view.n_tokens == len(view.runs))

    def run(self, compute: Any, ids: np.ndarray, view: PassView) -> torch.Tensor:
        cache = view.cache
        B = len(view.runs)
        n_blocks = -(-max(r.p1 for r in view.runs) // BUCKET) * (BUCKET // BLOCK)
        key = (id(cache), cache.generation, B, n_blocks, id(getattr(compute, "__self__", compute)))
        entry = self.graphs.get(key)
        if entry is not None and entry["cache"]() is not cache:
            del self.graphs[key]  # a cache that died and whose id came back: not this graph's
            entry = None
        tables, lens = decode_tables(view, B, n_blocks)
        host = {"ids": ids, "positions": view.positions, "write": view.write_rows, "tables": tables, "lens": lens}
        if entry is None:
            return self._capture(key, compute, host, cache)
        self.graphs.move_to_end(key)
        # the step's inputs in one copy from pinned memory (each small copy from pageable memory
        # costs microseconds of host time); the last step's copy must be done before its buffer is
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

    def _capture(self, key: tuple, compute: Any, host: dict, cache: TorchKVCache) -> torch.Tensor:
        dev = self.backend.device
        arrays = {name: np.ascontiguousarray(v, np.int64) for name, v in host.items()}
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()])).to(dev)
        static, at = {}, 0
        for name, a in arrays.items():  # views of one device buffer, filled by one copy per step
            static[name] = flat[at:at + a.size].view(a.shape)
            at += a.size
        meta = DeviceRuns(static["write"], static["tables"], static["lens"])
        view = StagedView(cache, meta)

        def step() -> torch.Tensor:
            self.backend._scratch = {}  # values shared by layers are computed inside the graph
            meta.derive()
            return compute(static["ids"], static["positions"], view, None)

        # the first run, on a side stream as torch requires before a capture, is this step's result
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
        self.graphs[key] = {"graph": graph, "static": static, "out": out, "cache": weakref.ref(cache), "flat": flat,
                            "staging": torch.empty(flat.shape, dtype=torch.int64, pin_memory=True),
                            "copied": torch.cuda.Event()}
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return result
