"""The paged decode-attention kernel alone (purelm/backends/numba_kernels/ops.py): a decode step of
several sequences, SmolLM2's attention shape by default (9 query heads over 3 KV heads of 64).

Each sequence's rows sit in shuffled blocks of the pools, as the paged cache leaves them. Two cases:
"cached" runs one layer's pools again and again (they stay in the CPU's caches); "memory" cycles
through 30 layers' pools, more than the caches hold, as a forward pass does. Reported per case:
microseconds per layer (best of the repetitions), the multiply-adds per second (scores and weighted
values) and the pools' bytes read per second.

    python benchmarks/attention_bench.py --out benchmarks/results/attention-<date>.json

Run it with another tree's purelm on PYTHONPATH to compare two versions of the kernel.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import numba
import numpy as np

from purelm.backends.kv_cache import BLOCK, Q8_0_BYTES, Q8_0_VALUES
from purelm.backends.numba_backend import ATTENTION_CHUNK, BLOCK_SHIFT
from purelm.backends.numba_kernels import ops

from batched import cpu_name  # (benchmarks/: this script's folder)

STORES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}


def pools(kind: str, rows: int, n_kv: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    width = dim // Q8_0_VALUES * Q8_0_BYTES if kind == "q8_0" else dim
    k, v = (rng.standard_normal((rows, n_kv, dim)).astype(np.float32) for _ in range(2))
    keys, values = np.zeros((rows, n_kv, width), STORES[kind]), np.zeros((rows, n_kv, width), STORES[kind])
    ops.store_rows_rounded(k, v, keys, values, np.arange(rows))
    return keys, values


def run(kind: str, threads: int, n_seq: int, ctx: int, n_head: int, n_kv: int, dim: int, layers: int,
        reps: int) -> dict:
    rng = np.random.default_rng(0)
    n_blocks = ctx // BLOCK + 1
    stores = [pools(kind, n_seq * n_blocks * BLOCK, n_kv, dim, rng) for _ in range(layers)]
    tables = rng.permutation(n_seq * n_blocks).astype(np.int32).reshape(n_seq, n_blocks)
    pos = np.full(n_seq, ctx - 1, np.int64)
    q = rng.standard_normal((n_seq, n_head, dim)).astype(np.float32)
    out = np.empty((n_seq, n_head * dim), np.float32)
    args = (np.float32(dim ** -0.5), np.float32(0), 0, np.zeros(0, np.float32), ATTENTION_CHUNK)
    numba.set_num_threads(threads)
    # (versions before the parallel kernel took its worker count: the kernel used numba's threads)
    workers = (threads,) if len(inspect.signature(ops.attention_paged_parallel.py_func).parameters) == 13 else ()

    def step(keys: np.ndarray, values: np.ndarray) -> None:
        if threads == 1:
            ops.attention_paged(q, keys, values, tables, pos, BLOCK_SHIFT, *args, out)
        else:
            ops.attention_paged_parallel(q, keys, values, tables, pos, BLOCK_SHIFT, *args, *workers, out)

    step(*stores[0])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for keys, values in stores:
            step(keys, values)
        best = min(best, (time.perf_counter() - t0) / layers)
    row_bytes = stores[0][0].shape[2] * stores[0][0].itemsize * n_kv
    return {"store": kind, "threads": threads, "layers": layers, "us_per_layer": round(best * 1e6, 1),
            "gmac_s": round(2 * n_seq * n_head * ctx * dim / best / 1e9, 3),
            "gb_s": round(2 * n_seq * ctx * row_bytes / best / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=8, help="sequences, one decode token each")
    ap.add_argument("--ctx", type=int, default=192, help="positions each token attends to")
    ap.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head size")
    ap.add_argument("--stores", default="f32,f16,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    n_head, n_kv, dim = (int(x) for x in a.heads.split(","))
    results = []
    for kind in a.stores.split(","):
        for threads in (int(t) for t in a.threads.split(",")):
            for case, layers in (("cached", 1), ("memory", 30)):
                r = dict(case=case, **run(kind, threads, a.seqs, a.ctx, n_head, n_kv, dim, layers,
                                          a.reps * (30 if layers == 1 else 1)))
                print(json.dumps(r), flush=True)
                results.append(r)
    doc = {"command": "python benchmarks/attention_bench.py " + " ".join(
               f"--{k} {v}" for k, v in vars(a).items() if v is not None and k != "out"),
           "cpu": cpu_name(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "seqs": a.seqs, "ctx": a.ctx, "heads": [n_head, n_kv, dim], "results": results}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
