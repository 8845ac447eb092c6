"""The KV cache on a torch device, and what one pass's attention needs of it, as device tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import UsageError
from ..kv_cache import BLOCK, KVCache, PassView


class TorchKVCache(KVCache):
    """KVCache (same blocks, same bookkeeping) whose stores are tensors on `device`. Blocks for one
    sequence of n_ctx positions are allocated up front, so a single sequence never moves its stores
    (a captured CUDA graph holds their addresses); `generation` counts the times they moved.

    Store types: "f32" is the backend's activation dtype (as before types existed: bf16 on CUDA),
    "f16" is torch.float16 (attention stores with .to(float16), round to nearest even as numpy and
    llama.cpp do, and reads rows back as float32). "q8_0" is refused: the attention reads the stores
    as dense float tensors (Triton's kernels included), so blocks of int8 would need their own
    kernels here."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int,
                 device: torch.device, dtype: torch.dtype, type_k: str = "f32", type_v: str = "f32") -> None:
        if "q8_0" in (type_k, type_v):
            raise UsageError("the torch backend keeps its KV cache as float tensors: cache types f32 "
                             "or f16 (q8_0 runs on the numba and numpy backends)")
        self.device, self.generation = device, 0
        super().__init__(n_layers, n_ctx, n_kv_heads, k_dim, v_dim, dtype, type_k, type_v)
        self._grow(max(4, -(-n_ctx // BLOCK)))

    def available_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return super().available_bytes()

    def _growth_bytes(self, old: int, capacity: int) -> int:
        return (capacity - old) * self.block_bytes  # device memory is taken when allocated

    def _zeros(self, shape: tuple[int, ...], kind: str) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float16 if kind == "f16" else self.dtype, device=self.device)

    def _grow(self, capacity: int) -> None:
        super()._grow(capacity)
        self.generation += 1

    def _take(self, store: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        x = store[torch.from_numpy(rows).to(self.device)]
        return (x if x.dtype == torch.float16 else x.float()).cpu().numpy()

    def _put(self, store: torch.Tensor, rows: np.ndarray, x: np.ndarray) -> None:
        store[torch.from_numpy(rows).to(self.device)] = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, store.dtype)


@dataclass
class DeviceRuns:
    """One pass's cache addressing on the device. Decode tokens (runs of one token) come first in a
    pass (Model.forward_batch orders them so) and are attended together: `tables` (B, blocks) holds
    their block tables padded with block 0, `lens` (B,) their lengths; `gather` (B, blocks * BLOCK)
    the cache rows of their positions, derived on the device. Longer runs are attended one by one
    over `runs` (t0, t1, p0, rows of positions 0..p1-1)."""

    write: torch.Tensor  # (tokens,) cache row of each token's key and value
    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    runs: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    _gather: torch.Tensor | None = None

    @property
    def n_decode(self) -> int:
        return 0 if self.lens is None else len(self.lens)

    def derive(self) -> None:
        """Forget what was derived from the tables (a captured graph's step refills them)."""
        self._gather = None

    @property
    def gather(self) -> torch.Tensor | None:
        """The decode tokens' cache rows from their block tables, derived on the device where first
        asked for (the plain torch attention; the Triton kernel reads the tables)."""
        if self._gather is None and self.tables is not None:
            p = torch.arange(self.tables.shape[1] * BLOCK, device=self.tables.device)
            self._gather = self.tables[:, p // BLOCK] * BLOCK + p % BLOCK
        return self._gather


def decode_tables(view: PassView, n_decode: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Block tables (padded to n_blocks with block 0) and lengths of the first n_decode runs."""
    tables = np.zeros((n_decode, n_blocks), np.int64)
    lens = np.zeros(n_decode, np.int64)
    for i in range(n_decode):
        t = view.tables[i]
        tables[i, :len(t)] = t[:n_blocks]
        lens[i] = view.runs[i].p1
    return tables, lens


def device_runs(view: PassView, device: torch.device) -> DeviceRuns:
    """The pass's addressing, uploaded once per pass (kept on the view for every layer)."""
    meta = getattr(view, "_device_runs", None)
    if meta is not None:
        return meta
    n_decode = 0
    while n_decode < len(view.runs) and view.runs[n_decode].t1 - view.runs[n_decode].t0 == 1:
        n_decode += 1
    meta = DeviceRuns(torch.from_numpy(view.write_rows).to(device))
    if n_decode:
        n_blocks = -(-max(r.p1 for r in view.runs[:n_decode]) // BLOCK)
        tables, lens = decode_tables(view, n_decode, n_blocks)
        meta.tables, meta.lens = torch.from_numpy(tables).to(device), torch.from_numpy(lens).to(device)
        meta.derive()
    for r, rows in zip(view.runs[n_decode:], view.rows_upto[n_decode:]):
        meta.runs.append((r.t0, r.t1, r.p0, torch.from_numpy(rows).to(device)))
    view._device_runs = meta
    return meta


class StagedView:
    """A captured pass's view (graphs.py): the cache's sizes and stores, and addressing held in static
    device tensors that each replay refills."""

    def __init__(self, cache: KVCache, meta: DeviceRuns, n_tokens: int) -> None:
        self.cache, self.n_layers, self.n_kv_heads = cache, cache.n_layers, cache.n_kv_heads
        self.k_dim, self.v_dim, self.n_ctx = cache.k_dim, cache.v_dim, cache.n_ctx
        self.type_k, self.type_v = cache.type_k, cache.type_v
        self.rotate_k, self.rotate_v = cache.rotate_k, cache.rotate_v
        self.k, self.v = cache.k, cache.v
        self.n_tokens = n_tokens
        self._device_runs = meta

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{name}: a captured pass only has device addressing")
