"""The first start on a new machine: `purelm generate MODEL "Hello" -n 8` with an empty numba cache
(cold: every kernel compiled), and again once the cache is full (warm).

Two ways of compiling run in turn, one fresh process and one fresh cache folder each, repetition
after repetition (A B A B ...):

  serial   PURELM_COMPILE_WORKERS=0: every kernel compiled in the process itself (the behaviour
           before worker processes)
  wait     PURELM_COMPILE_WAIT=1: the decode kernels compiled by this process and worker processes
           together before the first token, the prompt-only ones in the background
  workers  the default: every kernel compiled by worker processes, this process answering through
           the numpy backend's ops until they have the decode kernels (NumbaBackend.prepare,
           backends/interim.py)

Per run: wall seconds from spawn to exit, the process's own CPU seconds (user + system, wait4: not
its workers') and peak RSS. After each cold run `purelm warmup` completes the cache (it waits for
the background compiles), and the warm run starts once no worker of the cold run is left. The load average before each run is recorded:
the machine may be shared, and its other work slows cold starts most.

    python benchmarks/first_start.py --reps 3 > benchmarks/results/first_start.json

Models: SmolLM2 (purelm's cache) and, if present, /tmp/k-synth-q4km.gguf (a Q4_K_M file: Q4_K, Q6_K,
Q5_0, Q8_0). Prints one JSON document on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from load_bench import run_child  # (benchmarks/: this script's folder)

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from purelm.cli import main; sys.exit(main())"
MODES = {"serial": {"PURELM_COMPILE_WORKERS": "0"}, "wait": {"PURELM_COMPILE_WAIT": "1"}, "workers": {}}


def default_models() -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from purelm.paths import models_dir

    found = [models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", Path("/tmp/k-synth-q4km.gguf")]
    return [p for p in found if p.is_file()]


def timed(args: list[str], env: dict[str, str]) -> dict:
    """One CLI process: wall seconds, its own CPU seconds and peak RSS (MiB), from wait4."""
    load = os.getloadavg()[0]
    wall, usage, out = run_child([sys.executable, "-c", CLI, *args], env, cwd=ROOT)
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_avg": round(load, 2), "text": out.strip()[:80]}


def wait_for_workers(cache: Path, limit_s: float = 600.0) -> None:
    """Wait until no compile worker of a run with this cache folder is left (they outlive a short
    `purelm generate` to finish filling the cache), so that they do not slow the next run (Linux)."""
    mark = f"NUMBA_CACHE_DIR={cache}".encode()
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        busy = False
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                busy = b"compile_worker" in (proc / "cmdline").read_bytes() and mark in (proc / "environ").read_bytes()
            except OSError:
                continue
            if busy:
                break
        if not busy:
            return
        time.sleep(0.2)


def one_rep(model: Path, mode: str, args: argparse.Namespace) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="purelm-first-start-"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **MODES[mode])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode as a pip install leaves it (bench.thread_env)
    gen = ["generate", "-m", str(model), args.prompt, "-n", str(args.n), "--temp", "0"]
    if args.ignore_eos:
        gen.append("--ignore-eos")
    if args.threads:
        gen += ["-t", str(args.threads)]
    try:
        cold = timed(gen, env)
        timed(["warmup", "-m", str(model)] + (["-t", str(args.threads)] if args.threads else []), env)
        wait_for_workers(cache)
        warm = timed(gen, env)
        wait_for_workers(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"cold": cold, "warm": warm}


def summary(runs: list[dict], key: str) -> dict:
    walls = [r[key]["wall_s"] for r in runs]
    cpus = [r[key]["cpu_s"] for r in runs]
    return {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": min(walls), "wall_s_max": max(walls),
            "cpu_s_median": round(statistics.median(cpus), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="GGUF files (default: SmolLM2 and /tmp/k-synth-q4km.gguf)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="serial,wait,workers", help="comma-separated: serial, wait, workers")
    ap.add_argument("--prompt", default="Hello")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--ignore-eos", action="store_true", help="generate all -n tokens (a long first generation)")
    ap.add_argument("--threads", type=int, default=0, help="purelm's -t (default: its own choice)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.reps < 1:
        ap.error(f"modes are {', '.join(MODES)} and --reps at least 1")
    models = args.models or default_models()
    if not models:
        ap.error("no model: give a GGUF file (or `purelm pull smollm2`)")
    result = {"cpus": len(os.sched_getaffinity(0)), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": f"purelm generate MODEL {args.prompt!r} -n {args.n}" + " --ignore-eos" * args.ignore_eos,
              "models": {}}
    for model in models:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode in modes:
                r = one_rep(model, mode, args)
                runs[mode].append(r)
                print(f"{model.name} {mode} rep {rep}: cold {r['cold']['wall_s']} s (cpu {r['cold']['cpu_s']}, "
                      f"load {r['cold']['load_avg']}), warm {r['warm']['wall_s']} s", file=sys.stderr)
        result["models"][model.name] = {m: {"cold": summary(rs, "cold"), "warm": summary(rs, "warm"), "runs": rs}
                                        for m, rs in runs.items()}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
