"""Decode with many sequences at once: purelm's batched engine against llama.cpp's llama-batched-bench,
on the same file and threads, engines alternating run by run.

    python benchmarks/batched.py smollm2 --llama-bin DIR            # DIR: llama-batched-bench's folder
    python benchmarks/batched.py /tmp/tinyllama-synth.gguf --threads 2 --npl 1,8 --reps 2

As llama-batched-bench does (-npp 128 -ntg 64 -npl 1,2,4,8,16): for each number of parallel sequences B,
B prompts of npp tokens are prefilled, then every sequence decodes ntg tokens, one forward pass per
step for all of them. Reported per B: prefill and decode tokens/s summed over the sequences (medians
of --reps runs), decode's speed-up over one sequence, and the ratio to llama.cpp. JSON on stdout
(--out keeps a copy), a table on stderr. `../shared/peers/build-llama-cpp.sh` builds the peer.

The KV cache is each engine's default (purelm float32, llama.cpp f16) unless `--cache-type` sets one
type for both (`-ctk`/`-ctv` for llama.cpp).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """One purelm run of every B, in this process (its own thread settings and memory)."""
    import numpy as np

    import purelm

    ct = args.cache_type or "f32"
    llm = purelm.load(args.model, threads=args.threads, n_ctx=args.npp + args.ntg, cache_type_k=ct, cache_type_v=ct)
    model, rng = llm.model, np.random.default_rng(0)
    cache = model.new_cache(args.npp + args.ntg)  # warm-up: first passes load kernels and repack weights
    for ids in (rng.integers(0, model.n_vocab, args.npp), [1], [2]):
        model.forward(ids, cache)
    out = []
    for n_seq in args.npl:
        cache = model.new_cache(args.npp + args.ntg)
        seqs = [cache.add() for _ in range(n_seq)]
        prompts = [(s, rng.integers(0, model.n_vocab, args.npp)) for s in seqs]
        t0 = time.perf_counter()
        model.forward_batch(cache, prompts)
        t1 = time.perf_counter()
        for _ in range(args.ntg):
            model.forward_batch(cache, [(s, [int(rng.integers(0, model.n_vocab))]) for s in seqs])
        t2 = time.perf_counter()
        out.append(dict(pl=n_seq, speed_pp=n_seq * args.npp / (t1 - t0), speed_tg=n_seq * args.ntg / (t2 - t1),
                        cache_type=cache.type_k))
    print(json.dumps(out))


def run_purelm(args: argparse.Namespace, threads: int, int8: bool = False) -> list[dict]:
    cmd = [sys.executable, __file__, args.model, "--worker", "--threads", str(threads), "--npp", str(args.npp),
           "--ntg", str(args.ntg), "--npl", ",".join(map(str, args.npl))]
    if args.cache_type:
        cmd += ["--cache-type", args.cache_type]
    env = dict(os.environ, PURELM_INT8_DOT="1" if int8 else "0")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if r.returncode:
        raise RuntimeError(f"purelm worker failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_llama(args: argparse.Namespace, path: str, threads: int) -> list[dict]:
    exe = Path(args.llama_bin) / "llama-batched-bench"
    cmd = [str(exe), "-m", path, "-c", str(max(args.npl) * (args.npp + args.ntg)), "-b", "2048", "-ub", "512",
           "-npp", str(args.npp), "-ntg", str(args.ntg), "-npl", ",".join(map(str, args.npl)), "-t", str(threads),
           "--output-format", "jsonl"]
    if args.cache_type:
        cmd += ["-ctk", args.cache_type, "-ctv", args.cache_type]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"llama-batched-bench failed: {r.stderr[-2000:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a .gguf path or a known name (smollm2)")
    ap.add_argument("--llama-bin", default=None, help="folder of llama-batched-bench (omit: purelm alone)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--npl", default="1,2,4,8,16", help="numbers of parallel sequences")
    ap.add_argument("--npp", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=64, help="tokens each sequence decodes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--int8", action="store_true",
                    help="also run purelm with int8 activations (PURELM_INT8_DOT=1, llama.cpp's rounding)")
    ap.add_argument("--cache-type", choices=("f32", "f16", "q8_0"), default=None,
                    help="KV cache type of both engines (default: each its own, purelm f32 and llama.cpp f16)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.npl = [int(x) for x in str(args.npl).split(",")]
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)
    from purelm.hub import resolve

    path = str(resolve(args.model))
    runs: dict[tuple[str, int], list[list[dict]]] = {}
    for rep in range(args.reps):  # engines alternate run by run
        for threads in [int(t) for t in args.threads.split(",")]:
            engines = [("purelm", lambda t=threads: run_purelm(args, t))]
            if args.int8:
                engines.append(("purelm-int8", lambda t=threads: run_purelm(args, t, int8=True)))
            if args.llama_bin:
                engines.append(("llama.cpp", lambda t=threads: run_llama(args, path, t)))
            for name, run in (engines if rep % 2 == 0 else engines[::-1]):
                print(f"rep {rep + 1}/{args.reps}: {name}, {threads} thread(s)", file=sys.stderr, flush=True)
                runs.setdefault((name, threads), []).append(run())
    results = []
    for (name, threads), reps in runs.items():
        for n_seq in args.npl:
            rows = [next(r for r in rep if r["pl"] == n_seq) for rep in reps]
            results.append(dict(engine=name, threads=threads, pl=n_seq,
                                speed_pp=statistics.median(r["speed_pp"] for r in rows),
                                speed_tg=statistics.median(r["speed_tg"] for r in rows),
                                speed_tg_reps=[round(r["speed_tg"], 2) for r in rows]))
            if "cache_type" in rows[0]:  # purelm's cache as the worker made it
                results[-1]["cache_type"] = rows[0]["cache_type"]
    by = {(r["engine"], r["threads"], r["pl"]): r for r in results}
    for r in results:
        one = by[(r["engine"], r["threads"], 1)]["speed_tg"] if (r["engine"], r["threads"], 1) in by else None
        r["tg_vs_one_sequence"] = r["speed_tg"] / one if one else None
        peer = by.get(("llama.cpp", r["threads"], r["pl"]))
        if r["engine"].startswith("purelm") and peer:
            r["tg_vs_llama_cpp"] = r["speed_tg"] / peer["speed_tg"]
            r["pp_vs_llama_cpp"] = r["speed_pp"] / peer["speed_pp"]
    report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), model=path,
                  file_mb=os.path.getsize(path) / 2**20, cpu=cpu_name(), cores=os.cpu_count(),
                  time=time.strftime("%Y-%m-%d %H:%M:%S"), npp=args.npp, ntg=args.ntg, reps=args.reps,
                  cache_type=args.cache_type, results=results)
    print(f"{'engine':<11} {'thr':>3} {'seqs':>4} {'pp tok/s':>9} {'tg tok/s':>9} {'tg vs 1':>8} {'tg vs llama.cpp':>15}",
          file=sys.stderr)
    for r in results:
        vs = r.get("tg_vs_llama_cpp")
        print(f"{r['engine']:<11} {r['threads']:>3} {r['pl']:>4} {r['speed_pp']:>9.1f} {r['speed_tg']:>9.1f} "
              f"{r['tg_vs_one_sequence'] or 0:>7.2f}x {f'{vs:.2f}x' if vs else '':>15}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
