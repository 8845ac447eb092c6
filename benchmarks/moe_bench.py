"""Mixture-of-experts decode: purelm against llama.cpp on the same Qwen3-MoE-shaped file, and against
purelm's own decode of the dense model that reads as many weight bytes per token. Prints JSON.

    python benchmarks/make_synthetic.py /tmp/moe.gguf --moe
    python benchmarks/make_synthetic.py /tmp/dense.gguf --moe-dense-twin
    python benchmarks/moe_bench.py /tmp/moe.gguf /tmp/dense.gguf --threads 1,2 --reps 5 \\
        --llama-lib DIR [--llama-python PY]

For each thread count three worker processes (bench.py's: one engine each) decode --tg tokens one at a
time from an empty context (fixed random ids, llama-bench's tg test), taking turns within every
repetition (purelm MoE, llama.cpp MoE, purelm dense, ...); medians are reported. Each worker first runs
one untimed decode (llama-bench's warm-up; for purelm it also repacks the experts those tokens pick).
Ratios: purelm MoE / llama.cpp MoE, and purelm MoE / purelm dense (the MoE's cost of routing, small
expert matrices and their scattered reads).

Memory: a fresh purelm worker (no warm-up) decodes a short prompt (--short tokens), and its peak RSS is
set against the file's size: experts that no token picked are never read or repacked. llama.cpp's peak
RSS is from its timing worker (it maps and, with repacking, copies every expert at load).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (its worker processes and helpers)


def worker(engine: str, path: Path, args: argparse.Namespace, threads: int) -> bench.Worker:
    wargs = argparse.Namespace(model_path=path, llama_python=args.llama_python, llama_lib=args.llama_lib,
                               n_batch=64, cache_type=args.cache_type)
    w = bench.Worker(engine, wargs, threads, args.n_ctx, 1, "auto" if engine != bench.LLAMA else args.extra_bufts)
    if not w.hello.get("ready"):
        raise SystemExit(f"{engine} on {path.name} failed to start: {w.hello.get('error')}")
    return w


def tg(w: bench.Worker, ids: list[int]) -> float:
    out = w.ask(cmd="tg", ids=ids)
    if not out.get("ok"):
        raise SystemExit(f"{w.engine}: {out.get('error')}")
    return out["s"]


def run_threads(args: argparse.Namespace, threads: int, ids: list[int]) -> dict:
    engines = {"purelm_moe": ("numba", args.moe), "llama_cpp_moe": (bench.LLAMA, args.moe),
               "purelm_dense": ("numba", args.dense)}
    if args.llama_dense:
        engines["llama_cpp_dense"] = (bench.LLAMA, args.dense)
    workers = {name: worker(engine, path, args, threads) for name, (engine, path) in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in workers}
    loads: dict[str, list[float | None]] = {name: [] for name in workers}
    try:
        for name, w in workers.items():  # warm-up
            tg(w, ids)
        for rep in range(args.reps):
            for name, w in workers.items():
                busy0, cpu0, t0 = bench.cpu_busy_s(), w.cpu_s(), time.perf_counter()
                s = tg(w, ids)
                busy1, cpu1, wall = bench.cpu_busy_s(), w.cpu_s(), time.perf_counter() - t0
                other = None
                if None not in (busy0, busy1, cpu0, cpu1):  # cores other processes kept busy meanwhile
                    other = max(0.0, ((busy1[0] - busy0[0]) - (cpu1 - cpu0)) / wall)
                times[name].append(s)
                loads[name].append(other)
            bench.log(f"threads {threads} rep {rep + 1}: " + ", ".join(
                f"{n} {len(ids) / times[n][-1]:.1f}" for n in workers) + " tok/s")
    finally:
        closed = {name: w.close() for name, w in workers.items()}
    out = {name: bench.summarize(times[name], len(ids), loads[name]) for name in workers}
    for name in workers:
        out[name]["peak_rss_mb"] = round(closed[name].get("peak_rss_mb") or 0, 1)
        out[name]["load_s"] = round(workers[name].hello["load_s"], 3)
    moe, dense, ref = (statistics.median(len(ids) / t for t in times[n])
                       for n in ("purelm_moe", "purelm_dense", "llama_cpp_moe"))
    out["moe_vs_llama_cpp"] = round(moe / ref, 3)
    out["moe_vs_dense"] = round(moe / dense, 3)
    # per repetition, each against its neighbour in time (noise hits both alike)
    out["moe_vs_llama_cpp_reps"] = [round(b / a, 3) for a, b in zip(times["purelm_moe"], times["llama_cpp_moe"])]
    out["moe_vs_dense_reps"] = [round(b / a, 3) for a, b in zip(times["purelm_moe"], times["purelm_dense"])]
    return out


def short_prompt_memory(args: argparse.Namespace, ids: list[int]) -> dict:
    """A fresh purelm process: load, a prompt of len(ids) - 8 tokens, 8 decode steps; its peak RSS."""
    w = worker("numba", args.moe, args, 1)
    try:
        for cmd, part in (("pp", ids[:-8]), ("tg", ids[-8:])):
            if not w.ask(cmd=cmd, ids=part).get("ok"):
                raise SystemExit(f"memory run: {cmd} failed")
        stats = w.ask(cmd="stats")
    finally:
        w.close()
    size_mb = args.moe.stat().st_size / 2**20
    return {"tokens": len(ids), "file_mb": round(size_mb, 1), "peak_rss_mb": round(stats["peak_rss_mb"], 1),
            "rss_runtime_mb": round(w.hello["rss_runtime_mb"], 1),
            "peak_rss_over_file": round(stats["peak_rss_mb"] / size_mb, 3)}


def active_bytes(path: Path) -> int:
    """Weight bytes one decode step reads: every matrix but the embedding (one row of it is
    negligible), and of the expert tensors the share of the picked experts."""
    from purelm.formats.gguf import GGUFFile

    g = GGUFFile(path)
    md, arch = g.metadata, g.architecture
    used = md.get(f"{arch}.expert_used_count", 1) / md.get(f"{arch}.expert_count", 1)
    return int(sum(t.nbytes * (used if "_exps." in n else 1) for n, t in g.tensors.items() if n != "token_embd.weight"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("moe", type=Path, help="the MoE file (make_synthetic.py --moe)")
    ap.add_argument("dense", type=Path, help="the dense file with the same bytes per token (--moe-dense-twin)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tg", type=int, default=64, help="decode tokens per repetition")
    ap.add_argument("--short", type=int, default=12, help="tokens of the memory run (prompt + 8 decode steps)")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--llama-lib", help="LLAMA_CPP_LIB_PATH for the llama.cpp workers")
    ap.add_argument("--llama-python", help="interpreter for the llama.cpp workers (default: this one)")
    ap.add_argument("--extra-bufts", default="on", choices=["on", "off"],
                    help="llama.cpp's weight repacking (its default: on)")
    ap.add_argument("--llama-dense", action="store_true", help="also time llama.cpp on the dense file")
    ap.add_argument("--cache-type", choices=sorted(bench.LLAMA_CACHE_TYPES), default=None,
                    help="both engines' KV cache type (default: each engine's own, purelm f32, llama.cpp f16)")
    args = ap.parse_args(argv)
    rng = random.Random(0)
    ids = [rng.randrange(300, 30000) for _ in range(args.tg)]
    for path in (args.moe, args.dense):
        bench.warm_file(path)
    report = {"machine": bench.machine_info(), "moe_file": str(args.moe), "dense_file": str(args.dense),
              "moe_model": bench.model_info(args.moe), "dense_model": bench.model_info(args.dense),
              "tg": args.tg, "reps": args.reps, "cache_type": args.cache_type, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    report["active_bytes_per_token"] = {"moe": active_bytes(args.moe), "dense": active_bytes(args.dense)}
    report["memory"] = short_prompt_memory(args, [rng.randrange(300, 30000) for _ in range(max(args.short, 9))])
    bench.log("memory:", json.dumps(report["memory"]))
    report["threads"] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        report["threads"][str(threads)] = run_threads(args, threads, ids)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
