"""Time to first token in a fresh process, with and without the repacked-weights cache, against llama.cpp.

For each model, three variants run in turn, one fresh process each, repetition after repetition
(A B C A B C ...), the file already in the page cache:

  repack     purelm with PURELM_PACK_CACHE=0: every matrix repacked at load (the behaviour before the cache)
  first      purelm with the model's cache folder removed first: repacks and writes the cache
  cache      purelm with its cache present (the previous variant wrote it)
  llama.cpp  `llama-cli -m FILE -p hi -n 1 --no-repack` (its chat template around "hi", then one token)

Measured: wall seconds from process start to exit (all three), purelm's in-process first token (load
plus a 1-token forward, as bench.py's first_token_s: interpreter and imports excluded), and each
process's peak RSS (wait4). purelm's RSS bound is 1.2 x file + its KV cache at --n-ctx positions.
The page-cache state is the same for all: the model (and the cache entries) are read once first.

    python benchmarks/load_bench.py /tmp/tinyllama-synth-q4_0.gguf smollm2 --threads 2 --reps 5 \\
        --llama-bin /root/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin

Prints one JSON document on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import bench  # noqa: E402  (helpers: machine and model info, RSS, page-cache warming)

VARIANTS = ("repack", "first", "cache", "llama.cpp")


def worker(args: argparse.Namespace) -> int:
    """One purelm load and first token; prints what it measured as JSON."""
    eng = bench.PurelmEngine("numba", args.worker, args.threads, args.n_ctx)
    t0 = time.perf_counter()
    eng.reset()
    eng.eval([args.first_id])
    first = time.perf_counter() - t0
    print(json.dumps({"import_s": eng.import_s, "load_s": eng.load_s, "first_forward_s": first,
                      "first_token_s": eng.load_s + first, "kv_cache_mb": eng.kv_cache_mb,
                      "peak_rss_mb": bench.peak_rss_mb()}))
    return 0


def run_child(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, Any, str]:
    """Run cmd to its exit: wall seconds from spawn to exit, its own resource usage (wait4), stdout;
    a RuntimeError with the end of its stderr when it fails."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                             cwd=cwd)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        p.stdout.close()
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} exited {code}: {err.read().strip()[-800:]}")
    return wall, usage, out


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds from spawn to exit, peak RSS in MiB (the child's own, from wait4), stdout."""
    wall, usage, out = run_child(cmd, env)
    return wall, usage.ru_maxrss / 1024, out


def run_variant(variant: str, path: Path, args: argparse.Namespace) -> dict:
    env = bench.thread_env(args.threads)
    if variant == "llama.cpp":
        cmd = [str(Path(args.llama_bin) / "llama-cli"), "-m", str(path), "-p", "hi", "-n", "1",
               "-t", str(args.threads), "-c", str(args.n_ctx), "-st", "--no-warmup", "--simple-io",
               "--no-repack"]
        wall, peak, _ = timed(cmd, env)
        return {"wall_s": wall, "peak_rss_mb": peak}
    env["PURELM_PACK_CACHE"] = "0" if variant == "repack" else "1"
    if variant == "first":
        shutil.rmtree(cache_folder(path), ignore_errors=True)
    cmd = [sys.executable, str(HERE), "--worker", str(path), "--threads", str(args.threads),
           "--n-ctx", str(args.n_ctx), "--first-id", str(args.first_id)]
    wall, peak, out = timed(cmd, env)
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_s=wall, peak_rss_mb_wait4=peak)
    return res


def cache_folder(path: Path) -> Path:
    """The folder of `path`'s entries in purelm's repacked-weights cache."""
    from purelm.backends import pack_cache
    from purelm.formats.gguf import GGUFFile
    from purelm.paths import cache_dir

    g = GGUFFile(path)
    try:
        src = pack_cache.source_of(next(iter(g.tensors.values())).data)
        return pack_cache.model_folder(cache_dir() / "packed", src)
    finally:
        g.close()


def median_spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "reps": [round(v, 3) for v in values]}


def bench_model(path: Path, args: argparse.Namespace) -> dict:
    info = bench.model_info(path)
    bench.warm_file(path)
    run_variant("cache", path, args)  # untimed: writes the cache entries (and reads them into the page cache)
    variants = [v for v in VARIANTS if v != "llama.cpp" or args.llama_bin]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            runs[v].append(run_variant(v, path, args))
            r = runs[v][-1]
            bench.log(f"{path.name} rep {rep + 1} {v:9s} wall {r['wall_s']:.3f} s"
                      + (f"  first token {r['first_token_s']:.3f} s" if "first_token_s" in r else "")
                      + f"  peak RSS {r['peak_rss_mb']:.0f} MiB")
    out: dict = {"model": info, "variants": {}}
    for v, rs in runs.items():
        out["variants"][v] = {k: median_spread([r[k] for r in rs])
                              for k in ("wall_s", "first_token_s", "load_s", "first_forward_s", "peak_rss_mb")
                              if k in rs[0]}
    kv = runs["cache"][0]["kv_cache_mb"]
    out["rss_bound_mb"] = round(1.2 * info["file_bytes"] / 2**20 + kv, 1)
    med = {v: out["variants"][v]["wall_s"]["median"] for v in variants}
    first = {v: out["variants"][v]["first_token_s"]["median"] for v in ("repack", "first", "cache")}
    out["ratios"] = {"repack_over_cache_first_token": round(first["repack"] / first["cache"], 2),
                     "first_over_repack_first_token": round(first["first"] / first["repack"], 2)}
    if "llama.cpp" in med:
        out["ratios"]["cache_over_llama_wall"] = round(med["cache"] / med["llama.cpp"], 2)
        out["ratios"]["cache_first_token_over_llama_wall"] = round(first["cache"] / med["llama.cpp"], 2)
        out["ratios"]["repack_over_llama_wall"] = round(med["repack"] / med["llama.cpp"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help=".gguf paths or known names (smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-ctx", type=int, default=640, help="context of the KV cache (RSS bound), default 640")
    ap.add_argument("--first-id", type=int, default=1, help="the token of purelm's first forward (default 1)")
    ap.add_argument("--llama-bin", help="folder of llama.cpp's llama-cli; left out, llama.cpp is not run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, value in (("--threads", args.threads), ("--reps", args.reps), ("--n-ctx", args.n_ctx)):
        if value < 1:
            ap.error(f"{name} must be at least 1, got {value}")
    if args.first_id < 0:
        ap.error(f"--first-id must be >= 0, got {args.first_id}")
    if args.worker:
        return worker(args)
    if not args.models:
        ap.error("name at least one model")
    if args.llama_bin and not (Path(args.llama_bin) / "llama-cli").is_file():
        ap.error(f"--llama-bin: no llama-cli in {args.llama_bin}")
    report = {"machine": bench.machine_info(), "threads": args.threads, "reps": args.reps, "n_ctx": args.n_ctx,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "models": []}
    for name in args.models:
        report["models"].append(bench_model(bench.resolve_model(name), args))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
