"""The torch backend on a CUDA GPU: prefill and decode tokens/s, batched decode, memory, and the fraction
of the GPU's measured bandwidth that decode reaches. JSON out (--out), a table on stderr.

    python benchmarks/gpu_bench.py model.gguf [more.gguf ...] --out gpu_bench.json

For each file: prefill of --pp tokens and decode of --tg tokens from an empty context (medians of --reps
after one untimed run, llama-bench's tests; a prompt runs uncaptured the first time, and the second
time is captured as a CUDA graph: both runs' times are kept apart), a prompt 17 tokens shorter (the same graph, padded), decode and prefill again with CUDA graphs
off (what the graphs buy), the
aggregate decode rate of 1, 2, 4, 8, 16 sequences decoding together (each after a 32-token prompt),
torch.cuda.max_memory_allocated against the file plus the KV cache, and decode's weight bytes read per
second over the device-to-device copy bandwidth measured in the same run (bytes read + written).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from purelm.backends.torch_backend import Merged, TorchBackend  # noqa: E402
from purelm.backends.torch_backend.packed import Packed  # noqa: E402
from purelm.formats.gguf import GGUFFile  # noqa: E402
from purelm.models import build_model  # noqa: E402


DEVICE = "cuda"


class _NoCuda:
    """--device cpu (a dry run of this script without a GPU): the CUDA calls it makes, as no-ops."""

    @staticmethod
    def synchronize() -> None: ...
    @staticmethod
    def empty_cache() -> None: ...
    @staticmethod
    def reset_peak_memory_stats() -> None: ...
    @staticmethod
    def memory_allocated() -> int: return 0
    @staticmethod
    def max_memory_allocated() -> int: return 0
    @staticmethod
    def get_device_name() -> str: return "cpu (dry run)"


def cuda():
    return torch.cuda if DEVICE == "cuda" else _NoCuda


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    b.copy_(a)
    cuda().synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    cuda().synchronize()
    dt = (time.perf_counter() - t0) / reps
    del a, b
    cuda().empty_cache()
    return 2 * nbytes / dt


def matrices(obj: object, seen: dict[int, object], depth: int = 0) -> None:
    """Every weight reachable from the model (packed, merged or dense), once."""
    if depth > 6 or id(obj) in seen:
        return
    if isinstance(obj, (Packed, torch.Tensor)):
        seen[id(obj)] = obj
        return
    if isinstance(obj, Merged):
        matrices(obj.w, seen, depth + 1)
        return
    items = obj if isinstance(obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
    if isinstance(obj, (list, tuple)) or hasattr(obj, "__dict__"):
        if isinstance(obj, (int, float, str, np.ndarray, GGUFFile, TorchBackend)):
            return
        for v in items:
            matrices(v, seen, depth + 1)


def bytes_per_token(model: object) -> int:
    """Weight bytes one decode step reads: every matrix, the token embedding only where it is also the
    output matrix (a lookup reads one row)."""
    seen: dict[int, object] = {}
    matrices(model, seen)
    total = sum(w.nbytes for w in seen.values())
    embd, out = getattr(model, "tok_embd", None), getattr(model, "output", None)
    if embd is not None and embd is not out:
        total -= embd.nbytes
    return total


def timed(fn, reps: int, first: list[float] | None = None) -> list[float]:
    t0 = time.perf_counter()
    fn()  # untimed: compiles kernels, captures graphs
    cuda().synchronize()
    if first is not None:
        first.append(time.perf_counter() - t0)
    out = []
    for _ in range(reps):
        cuda().synchronize()
        t0 = time.perf_counter()
        fn()
        cuda().synchronize()
        out.append(time.perf_counter() - t0)
    return out


def bench_file(path: str, args: argparse.Namespace, bandwidth: float) -> dict:
    cuda().empty_cache()
    cuda().reset_peak_memory_stats()
    base = cuda().memory_allocated()
    t0 = time.perf_counter()
    ops = TorchBackend(DEVICE, args.dtype)
    model = build_model(GGUFFile(path), ops)
    n_ctx = args.pp + args.tg + 64
    cache = model.new_cache(n_ctx)
    cuda().synchronize()
    load_s = time.perf_counter() - t0
    weights_mb = (cuda().memory_allocated() - base) / 2**20
    load_peak_mb = (cuda().max_memory_allocated() - base) / 2**20
    file_mb = Path(path).stat().st_size / 2**20
    kv_mb = cache.nbytes / 2**20
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.n_vocab, args.pp + args.tg)
    res: dict = {"file": path, "file_mb": round(file_mb, 1), "load_s": round(load_s, 2),
                 "weights_on_gpu_mb": round(weights_mb, 1), "load_peak_mb": round(load_peak_mb, 1),
                 "kv_cache_mb": round(kv_mb, 1), "n_ctx": n_ctx}

    def decode() -> None:
        cache.truncate(0)
        for i in range(args.tg):
            model.forward(ids[i:i + 1], cache)

    cuda().reset_peak_memory_stats()
    tg = timed(decode, args.reps)
    res["decode_tok_s"] = round(args.tg / statistics.median(tg), 1)
    res["decode_runs_s"] = [round(t, 4) for t in tg]
    res["decode_max_allocated_mb"] = round((cuda().max_memory_allocated() - base) / 2**20, 1)
    res["decode_memory_over_file_plus_kv"] = round(res["decode_max_allocated_mb"] / (file_mb + kv_mb), 3)
    read = bytes_per_token(model)
    res["weight_bytes_per_token"] = read
    res["decode_read_gb_s"] = round(read * res["decode_tok_s"] / 1e9, 1)
    res["decode_fraction_of_copy_bandwidth"] = round(read * res["decode_tok_s"] / bandwidth, 3)
    log(f"  decode {res['decode_tok_s']} tok/s, {res['decode_read_gb_s']} GB/s of weights "
        f"({res['decode_fraction_of_copy_bandwidth']:.1%} of the copy bandwidth)")

    def prefill() -> None:
        cache.truncate(0)
        model.forward(ids[:args.pp], cache)

    cuda().reset_peak_memory_stats()
    first: list[float] = []
    capture: list[float] = []
    timed(prefill, 0, first)  # the first prompt of its shape runs uncaptured (and compiles its kernels)
    pp = timed(prefill, args.reps, capture)  # (its untimed run captures the prompt's graph)
    res["prefill_tok_s"] = round(args.pp / statistics.median(pp), 1)
    res["prefill_first_s"], res["prefill_capture_s"] = round(first[0], 4), round(capture[0], 4)
    res["prefill_max_allocated_mb"] = round((cuda().max_memory_allocated() - base) / 2**20, 1)
    res["prefill_memory_over_file_plus_kv"] = round(res["prefill_max_allocated_mb"] / (file_mb + kv_mb), 3)
    log(f"  prefill {res['prefill_tok_s']} tok/s (first run {res['prefill_first_s']} s, "
        f"the one that captures {res['prefill_capture_s']} s)")

    def prefill_shorter() -> None:  # another length in the same bucket of 64 tokens: the same graph
        cache.truncate(0)
        model.forward(ids[:args.pp - 17], cache)

    res["prefill_shorter_tok_s"] = round((args.pp - 17) / statistics.median(timed(prefill_shorter, args.reps)), 1)
    log(f"  prefill of {args.pp - 17} tokens {res['prefill_shorter_tok_s']} tok/s")

    runner, ops.graphs = ops.graphs, None  # the same passes, every kernel launched from Python
    tg_eager = timed(decode, max(1, args.reps // 2))
    pp_eager = timed(prefill, args.reps)
    ops.graphs = runner
    res["decode_no_graphs_tok_s"] = round(args.tg / statistics.median(tg_eager), 1)
    res["prefill_no_graphs_tok_s"] = round(args.pp / statistics.median(pp_eager), 1)
    log(f"  without CUDA graphs: decode {res['decode_no_graphs_tok_s']} tok/s, "
        f"prefill {res['prefill_no_graphs_tok_s']} tok/s")

    batched = {}
    for n_seq in args.batch:
        bc = model.new_cache(32 + args.batch_tg + 8)
        seqs = [0] + [bc.add() for _ in range(n_seq - 1)]
        prompts = [rng.integers(3, model.n_vocab, 32) for _ in seqs]
        steps = rng.integers(3, model.n_vocab, (args.batch_tg, n_seq))

        def decode_together() -> None:
            for row in steps:
                model.forward_batch(bc, [(s, row[j:j + 1]) for j, s in enumerate(seqs)])

        times = []
        for rep in range(1 + max(1, args.reps // 2)):  # the first untimed: captures the graphs
            for s in seqs:
                bc.truncate(0, s)
            model.forward_batch(bc, list(zip(seqs, prompts)))
            cuda().synchronize()
            t0 = time.perf_counter()
            decode_together()
            cuda().synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
        agg = n_seq * args.batch_tg / statistics.median(times)
        batched[n_seq] = round(agg, 1)
        log(f"  {n_seq} sequences: {agg:.1f} tok/s in all")
    res["batched_decode_tok_s"] = batched
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--batch-tg", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    args.batch = [int(x) for x in args.batch.split(",")]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: this benchmark is for a GPU (--device cpu: a dry run)")
        return 2
    bw = copy_bandwidth(256 << 20 if DEVICE == "cpu" else 2 << 30)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"gpu": cuda().get_device_name(), "torch": torch.__version__,
                          "python": platform.python_version(),
                          "copy_bandwidth_gb_s": round(bw / 1e9, 1)},
              "settings": {k: getattr(args, k) for k in ("pp", "tg", "reps", "batch", "batch_tg", "dtype")},
              "results": []}
    log(f"{report['machine']['gpu']}: device-to-device copy {bw / 1e9:.0f} GB/s (read + written)")
    for path in args.models:
        log(path)
        try:
            report["results"].append(bench_file(path, args, bw))
        except Exception as e:  # keep the other files' figures
            import traceback

            traceback.print_exc()
            report["results"].append({"file": path, "error": f"{type(e).__name__}: {e}"})
        gc.collect()  # the backend and its captured graphs hold each other
        cuda().empty_cache()
        if args.out:  # after each file, so a later failure keeps these
            Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
