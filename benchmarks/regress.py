"""Quick performance-regression check for purelm's kernels, to run before merging kernel changes.

Times, on one backend and thread count:
  * the matrix-vector product (`backend.linear` of one token) for every weight type the backend handles,
    on random packed weights of typical shapes (default 2048x2048 and 5632x2048, out x in);
  * a short SmolLM2 decode (and a short prefill) through the whole model;
  * one sampled token from 49152 logits (top-k 40, top-p 0.95, min-p 0.05), what each token of each
    sequence costs besides the forward pass.

Prints JSON and, given a baseline, compares: an entry more than --threshold (default 10%) slower than
the baseline is a regression, and the exit code is 1. Timings are the best of --reps runs by default
(`--stat min`): the least noisy statistic on a shared machine. Entries that look regressed are measured
again (--recheck times) before they are reported.

    python benchmarks/regress.py --save-baseline            # on main: record
    python benchmarks/regress.py --baseline                 # on the branch: compare
    python benchmarks/regress.py --baseline base.json --backend numpy --types Q4_0,Q8_0 --no-model

The default baseline file is ~/.cache/purelm/bench/regress-baseline-<backend>-t<threads>.json. A baseline
is only meaningful on the machine (and thread count) that recorded it; a mismatch is warned about.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from purelm.backends import get_backend
from purelm.formats.gguf import GGUFFile, Tensor
from purelm.quant.types import BLOCK_INFO, GGMLType

DEFAULT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                 "IQ4_XS", "F16", "F32")
# byte offsets of the float16 scale fields inside one block (everything else may be random bits)
F16_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q8_1: (0, 2), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
}


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def random_tensor(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> Tensor:
    """A Tensor of random packed weights with small, finite scales."""
    if qtype == GGMLType.F32:
        data = (rng.standard_normal((rows, cols), np.float32) * np.float32(0.02)).view(np.uint8)
    elif qtype == GGMLType.F16:
        data = (rng.standard_normal((rows, cols), np.float32) * np.float32(0.02)).astype(np.float16).view(np.uint8)
    elif qtype == GGMLType.BF16:
        f = rng.standard_normal((rows, cols), np.float32) * np.float32(0.02)
        data = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif qtype in F16_FIELDS:
        block, size = BLOCK_INFO[qtype]
        blocks = rng.integers(0, 256, (rows * (cols // block), size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            scale = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
            blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
        data = blocks.reshape(rows, -1)
    else:
        raise ValueError(f"no random generator for {qtype.name}")
    data = np.ascontiguousarray(data).reshape(rows, -1)
    return Tensor(f"bench.{qtype.name}", qtype, (rows, cols), 0, data)


def timed(fn, reps: int, min_time: float = 0.0) -> list[float]:
    """Seconds per call of fn, `reps` samples; a sample loops fn until it lasts min_time."""
    fn()  # warm-up: JIT compilation, caches
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, int(min_time / one)) if one > 0 else 1
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def stats(samples: list[float]) -> dict:
    return {"s_min": min(samples), "s_median": statistics.median(samples), "n": len(samples)}


def bench_kernels(backend, types: list[str], shapes: list[tuple[int, int]], batches: list[int], reps: int,
                  seed: int) -> tuple[dict, dict]:
    """{key: stats} for each supported type x shape x batch; {type: why} for unsupported ones."""
    rng = np.random.default_rng(seed)
    results, skipped = {}, {}
    for name in types:
        qtype = GGMLType[name]
        for n_out, n_in in shapes:
            if n_in % BLOCK_INFO[qtype][0]:
                continue
            t = random_tensor(qtype, n_out, n_in, rng)
            try:
                w = backend.weight(t)
                backend.linear(np.zeros((1, n_in), np.float32), w)
            except Exception as e:  # noqa: BLE001 (a backend without this type)
                skipped[name] = f"{type(e).__name__}: {e}"
                break
            for b in batches:
                x = rng.standard_normal((b, n_in), np.float32)
                samples = timed(lambda: backend.linear(x, w), reps, min_time=0.002)
                key = f"linear/{name}/{n_out}x{n_in}/b{b}"
                s = stats(samples)
                s["weight_gb_s"] = round(t.nbytes / s["s_min"] / 1e9, 2)
                if hasattr(w, "packed"):  # which numba kernel ran (see packing.py)
                    from purelm.backends.numba_backend import MATVEC_MAX_TOKENS

                    family = w.packed.family if w.packed is not None else "rows"
                    s["kernel"] = "blas" if b > MATVEC_MAX_TOKENS else family  # prefill: tiles for BLAS
                results[key] = s
                log(f"regress: {key:32s} {s['s_min'] * 1e6:10.1f} us  {s['weight_gb_s']:6.2f} GB/s")
    return results, skipped


def bench_model(backend, path: Path, pp: int, tg: int, reps: int, seed: int) -> dict:
    from purelm.models import build_model

    model = build_model(GGUFFile(path), backend)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(max(pp, tg) + 8)
    ids_pp = rng.integers(3, model.n_vocab, pp)
    ids_tg = rng.integers(3, model.n_vocab, tg)

    def prefill():
        cache.truncate(0)
        model.forward(ids_pp, cache)

    def decode():
        cache.truncate(0)
        for i in ids_tg:
            model.forward(np.array([i]), cache)

    out = {}
    if pp:
        out[f"model/pp{pp}"] = stats(timed(prefill, reps))
        log(f"regress: model/pp{pp}: {pp / out[f'model/pp{pp}']['s_min']:.1f} tok/s (best)")
    if tg:
        out[f"model/tg{tg}"] = stats(timed(decode, reps))
        log(f"regress: model/tg{tg}: {tg / out[f'model/tg{tg}']['s_min']:.1f} tok/s (best)")
    return out


def bench_sampling(reps: int, seed: int, vocab: int = 49152) -> dict:
    """One sampled token from a vocabulary's logits with the settings of `purelm serve`'s clients and
    bench.py's stream test (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05): what every token of
    every sequence costs after its forward pass."""
    from purelm.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=seed))
    key = f"sample/{vocab}/k40"
    out = {key: stats(timed(lambda: sampler(logits, [1, 2, 3]), reps, min_time=0.002))}
    log(f"regress: {key:32s} {out[key]['s_min'] * 1e6:10.1f} us")
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import numba

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "host": platform.node(),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def compare(current: dict, base: dict, stat: str, threshold: float) -> dict:
    cur, old = current["timings"], base.get("timings", {})
    entries, regressions, improvements = {}, [], []
    for key, s in cur.items():
        if key not in old:
            continue
        ratio = s[stat] / old[key][stat]  # time now / time then: above 1 = slower
        entries[key] = round(ratio, 3)
        if ratio > 1 + threshold:
            regressions.append({"key": key, "ratio": round(ratio, 3), "now_s": s[stat], "baseline_s": old[key][stat]})
        elif ratio < 1 / (1 + threshold):
            improvements.append({"key": key, "ratio": round(ratio, 3)})
    warnings = []
    for k in ("backend", "threads", "int16_dot"):
        if base.get(k, False if k == "int16_dot" else None) != current.get(k):
            warnings.append(f"baseline {k} {base.get(k)!r} differs from {current.get(k)!r}")
    bm, cm = base.get("machine", {}), current.get("machine", {})
    if bm.get("cpu") != cm.get("cpu") or bm.get("host") != cm.get("host"):
        warnings.append(f"baseline was recorded on another machine ({bm.get('host')}, {bm.get('cpu')})")
    return {"stat": stat, "threshold": threshold, "ratios": entries, "regressions": regressions,
            "improvements": improvements, "missing_in_baseline": sorted(set(cur) - set(old)),
            "missing_now": sorted(set(old) - set(cur)), "warnings": warnings}


def default_baseline(backend: str, threads: int) -> Path:
    root = Path(os.environ.get("PURELM_CACHE") or Path.home() / ".cache" / "purelm")
    return root / "bench" / f"regress-baseline-{backend}-t{threads}.json"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        a, _, b = item.lower().partition("x")
        out.append((int(a), int(b)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backend", default="numba", help="numba (default) or numpy")
    ap.add_argument("--threads", type=int, default=1, help="threads (default 1: the steadiest numbers)")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="weight types to time")
    ap.add_argument("--shapes", default="2048x2048,5632x2048", help="out x in shapes (default 2048x2048,5632x2048)")
    ap.add_argument("--batch", default="1", help="tokens per linear call; e.g. 1,64 adds a prefill-sized GEMM")
    ap.add_argument("--reps", type=int, default=15, help="samples per kernel (default 15)")
    ap.add_argument("--model", default="smollm2", help="model for the end-to-end decode (default smollm2)")
    ap.add_argument("--no-model", action="store_true", help="skip the end-to-end model timings")
    ap.add_argument("--pp", type=int, default=64, help="prefill tokens for the model timing (0: skip)")
    ap.add_argument("--tg", type=int, default=32, help="decoded tokens for the model timing (0: skip)")
    ap.add_argument("--model-reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", nargs="?", const="", help="compare with this baseline JSON (no value: default file)")
    ap.add_argument("--save-baseline", nargs="?", const="", help="write the results as the baseline (no value: default file)")
    ap.add_argument("--threshold", type=float, default=0.10, help="slowdown that counts as a regression (default 0.10)")
    ap.add_argument("--stat", choices=("s_min", "s_median", "min", "median"), default="s_min")
    ap.add_argument("--recheck", type=int, default=2, help="re-measure apparent regressions up to N times (default 2)")
    args = ap.parse_args(argv)
    stat = args.stat if args.stat.startswith("s_") else f"s_{args.stat}"

    os.environ.setdefault("PURELM_NUM_THREADS", str(args.threads))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    try:
        backend = get_backend(args.backend, args.threads)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"backend {args.backend!r} unavailable: {e}"}))
        return 2
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    shapes = parse_shapes(args.shapes)
    batches = [int(b) for b in args.batch.split(",") if b]

    t_start = time.perf_counter()
    timings, skipped = bench_kernels(backend, types, shapes, batches, args.reps, args.seed)
    timings.update(bench_sampling(args.reps, args.seed))
    model_path = None
    if not args.no_model:
        from purelm.hub import resolve

        try:
            model_path = resolve(args.model)
            timings.update(bench_model(backend, Path(model_path), args.pp, args.tg, args.model_reps, args.seed))
        except Exception as e:  # noqa: BLE001
            skipped["model"] = f"{type(e).__name__}: {e}"
    report = {"backend": getattr(backend, "name", args.backend), "threads": args.threads,
              "int16_dot": getattr(backend, "int16_dot", False), "machine": machine(),
              "settings": {"types": types, "shapes": [f"{a}x{b}" for a, b in shapes], "batch": batches,
                           "reps": args.reps, "model": str(model_path) if model_path else None,
                           "pp": args.pp, "tg": args.tg, "model_reps": args.model_reps, "seed": args.seed},
              "timings": timings, "unsupported": skipped}

    if args.baseline is not None:
        path = Path(args.baseline) if args.baseline else default_baseline(report["backend"], args.threads)
        if not path.exists():
            report["comparison"] = {"error": f"no baseline at {path} (make one with --save-baseline)"}
        else:
            base = json.loads(path.read_text())
            cmp = compare(report, base, stat, args.threshold)
            for _ in range(args.recheck):  # noise guard: re-measure what looks slower, keep the best
                if not cmp["regressions"]:
                    break
                log(f"regress: re-checking {len(cmp['regressions'])} apparent regression(s)")
                keys = {r["key"] for r in cmp["regressions"]}
                kern = [k for k in keys if k.startswith("linear/")]
                for k in kern:
                    _, name, shape, b = k.split("/")
                    again, _ = bench_kernels(backend, [name], parse_shapes(shape), [int(b[1:])], args.reps,
                                             args.seed)
                    for kk, s in again.items():
                        if s[stat] < timings[kk][stat]:
                            timings[kk] = s
                if any(k.startswith("sample/") for k in keys):
                    for kk, s in bench_sampling(args.reps, args.seed).items():
                        if s[stat] < timings[kk][stat]:
                            timings[kk] = s
                if any(k.startswith("model/") for k in keys) and model_path:
                    again = bench_model(backend, Path(model_path), args.pp, args.tg, args.model_reps, args.seed)
                    for kk, s in again.items():
                        if s[stat] < timings[kk][stat]:
                            timings[kk] = s
                cmp = compare(report, base, stat, args.threshold)
            cmp["baseline"] = str(path)
            report["comparison"] = cmp
            for w in cmp["warnings"]:
                log(f"regress: warning: {w}")
            for r in cmp["regressions"]:
                log(f"regress: SLOWER {r['key']}: {r['ratio']:.2f}x the baseline time")
            if not cmp["regressions"]:
                log(f"regress: no slowdowns over {args.threshold:.0%} against {path}")
    if args.save_baseline is not None:
        path = Path(args.save_baseline) if args.save_baseline else default_baseline(report["backend"], args.threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["saved_baseline"] = str(path)
        log(f"regress: baseline saved to {path}")
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report, indent=2))
    return 1 if report.get("comparison", {}).get("regressions") else 0


if __name__ == "__main__":
    sys.exit(main())
