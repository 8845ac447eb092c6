"""A/B of the numba backend against a git revision, in one process, the two alternating.

On a shared VM the speed of the same code moves by up to 2x within minutes, so two runs one after the
other say little about a kernel change. This script imports the revision's `purelm` package as
`purelm_base` (a copy made with `git archive`; numba keys its cache entries by the copy's own paths) beside
the working tree's, and times both in turns: first checking that they give the same bits (the check
fails the run where they do not, `--allow-different` to time anyway), then alternating the order
round by round, so a slow phase of the machine hits both. Medians and base/new ratios, JSON on stdout.

    python benchmarks/ab.py --base HEAD~1                            # products, decode, prefill, 8 sequences
    python benchmarks/ab.py --base main --tests products --cases Q4_1:3072x576,Q6_K:2048x2048 --tokens 1,8
    python benchmarks/ab.py --base HEAD~1 --tests decode,prefill --threads 2 --rounds 6

Tests: `products` (backend.linear of random packed weights, --cases TYPE:ROWSxCOLS, --tokens), `decode`
(SmolLM2 greedy decode through LLM.stream_chunks, 8-token blocks alternating within one generation),
`prefill` (a 512-token prompt's logits), `batch` (8 sequences with LLM.stream_batch). The model is
SmolLM2 from purelm's cache unless --model says otherwise, its KV cache float32 unless --cache-type says otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's purelm, before any installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def base_package(rev: str) -> str:
    """The revision's purelm/ as the package `purelm_base`, exported once per commit into a folder
    of the temp dir that later runs reuse (so the copy's kernels, cached by numba under their paths,
    load instead of compiling again); returns the commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    folder = Path(tempfile.gettempdir()) / f"purelm-ab-{commit[:12]}"
    if not (folder / "purelm_base").is_dir():
        part = Path(tempfile.mkdtemp(prefix="purelm-ab-part-"))
        archive = subprocess.run(["git", "archive", commit, "purelm"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(part)], input=archive, check=True)
        (part / "purelm").rename(part / "purelm_base")
        try:
            part.rename(folder)  # whole or not at all (another run may have made it meanwhile)
        except OSError:
            shutil.rmtree(part, ignore_errors=True)
    sys.path.insert(0, str(folder))
    return commit


def alternate(runs: dict, rounds: int) -> dict:
    """Call runs[name]() round by round, the order flipping each round; returns each one's times."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(runs[name]())
    return times


def summary(times: dict, unit_per_s: float | None = None) -> dict:
    """Medians (seconds, or units per second when `unit_per_s` is the units of one call) and base/new."""
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: round(v * 1e6, 1) if unit_per_s is None else round(unit_per_s / v, 2) for k, v in med.items()}
    key = "us" if unit_per_s is None else "per_s"
    return {f"base_{key}": out["base"], f"new_{key}": out["new"], "new_speedup": round(med["base"] / med["new"], 3),
            "rounds_new_faster": sum(b > n for b, n in zip(times["base"], times["new"])), "rounds": len(times["new"])}


def products(backends: dict, args: argparse.Namespace) -> dict:
    from regress import random_tensor

    from purelm.quant.types import GGMLType

    out = {}
    rng = np.random.default_rng(0)
    for name, rows, cols in args.cases:
        t = random_tensor(GGMLType[name], rows, cols, rng)
        weights = {k: b.weight(t) for k, b in backends.items()}
        for n in (int(v) for v in args.tokens.split(",")):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            ys = {k: backends[k].linear(x, weights[k]) for k in backends}
            same = bool(np.array_equal(ys["base"], ys["new"]))
            if not same and not args.allow_different:
                raise SystemExit(f"{name} {rows}x{cols}, {n} tokens: base and new products differ")

            def timed(k: str) -> float:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    backends[k].linear(x, weights[k])
                return (time.perf_counter() - t0) / args.calls
            res = summary(alternate({"base": lambda: timed("base"), "new": lambda: timed("new")}, args.rounds))
            out[f"{name}/{rows}x{cols}/{n}"] = dict(res, same_bits=same)
            log(f"products {name} {rows}x{cols} x{n}: {res}")
    return out


def model_tests(backends: dict, args: argparse.Namespace, tests: list[str]) -> dict:
    import purelm
    from purelm.backends.base import Backend

    Backend.register(type(backends["base"]))  # the base's Backend class is another class object
    ct = args.cache_type
    llms = {k: purelm.load(args.model, backend=b, n_ctx=2048, cache_type_k=ct, cache_type_v=ct) for k, b in backends.items()}
    ids = llms["new"].tokenize((ROOT / "tests/fixtures/agreement.txt").read_text())[:512]
    out = {}
    if "decode" in tests:
        prompt = "Write a long story about a lighthouse keeper who finds a map."
        blocks: dict[str, list[float]] = {"base": [], "new": []}
        texts = {}
        for r in range(args.rounds):
            streams = {k: llm.stream_chunks(prompt, max_tokens=257, temperature=0, ignore_eos=True) for k, llm in llms.items()}
            for s in streams.values():
                next(s)
            tokens: dict[str, list] = {"base": [], "new": []}
            for i in range(32):  # 8-token blocks, the order flipping block by block
                for k in (("base", "new") if i % 2 == 0 else ("new", "base")):
                    t0 = time.perf_counter()
                    tokens[k] += [next(streams[k]).token for _ in range(8)]
                    blocks[k].append(time.perf_counter() - t0)
            texts = tokens
        if texts["base"] != texts["new"] and not args.allow_different:
            raise SystemExit("decode: base and new generated different tokens")
        out["decode"] = dict(summary(blocks, 8), same_tokens=texts["base"] == texts["new"])
        log(f"decode: {out['decode']}")
    if "prefill" in tests:
        same = bool(np.array_equal(llms["base"].logits(ids[:64]), llms["new"].logits(ids[:64])))
        if not same and not args.allow_different:
            raise SystemExit("prefill: base and new logits differ")

        def prefill(k: str) -> float:
            t0 = time.perf_counter()
            llms[k].logits(ids)
            return time.perf_counter() - t0
        out["prefill"] = dict(summary(alternate({k: (lambda k=k: prefill(k)) for k in llms}, args.rounds), len(ids)),
                              same_bits=same)
        log(f"prefill: {out['prefill']}")
    if "batch" in tests:
        prompts = [ids[:64 + 8 * j] for j in range(8)]

        def batch(k: str) -> float:  # decode steps only: the time from each sequence's first token on
            stamps = []
            for _ in llms[k].stream_batch(prompts, max_tokens=33, temperature=0, ignore_eos=True):
                stamps.append(time.perf_counter())
            return (stamps[-1] - stamps[7]) / (len(stamps) - 8)
        out["batch"] = summary(alternate({k: (lambda k=k: batch(k)) for k in llms}, args.rounds), 1)
        log(f"batch (8 sequences, decode tokens/s in all): {out['batch']}")
    return out


def parse_case(ap: argparse.ArgumentParser, case: str) -> tuple[str, int, int]:
    """--cases' TYPE:ROWSxCOLS -> (type name, rows, cols), or an argument error."""
    from purelm.quant.types import GGMLType

    try:
        name, shape = case.split(":")
        rows, cols = (int(v) for v in shape.split("x"))
        GGMLType[name]
    except (ValueError, KeyError):
        ap.error(f"--cases: {case!r} is not TYPE:ROWSxCOLS with a GGML type name (Q4_1:3072x576)")
    if rows < 1 or cols < 1 or rows * cols > 1 << 28:
        ap.error(f"--cases: {case!r} needs 1 to 2**28 weights")
    return name, rows, cols


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    ap.add_argument("--tests", default="products,decode,prefill,batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6, help="alternations per measurement (products: at least 30)")
    ap.add_argument("--cases", default="Q4_1:3072x576,Q8_0:3072x576,Q4_K:2048x2048,Q6_K:2048x2048,Q5_0:2048x2048")
    ap.add_argument("--tokens", default="1,2,8", help="tokens per product (default 1,2,8)")
    ap.add_argument("--calls", type=int, default=5, help="products per timed sample (default 5)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cache-type", choices=("f32", "f16", "q8_0"), default="f32", help="KV cache type of the model tests")
    ap.add_argument("--allow-different", action="store_true", help="time base and new even where their results differ")
    args = ap.parse_args()
    tests = [t for t in args.tests.split(",") if t]
    unknown = set(tests) - {"products", "decode", "prefill", "batch"}
    if unknown:
        ap.error(f"unknown tests: {', '.join(sorted(unknown))}")
    if min(args.threads, args.rounds, args.calls) < 1:
        ap.error("--threads, --rounds and --calls must be at least 1")
    args.cases = [parse_case(ap, c) for c in args.cases.split(",") if c]
    try:
        tokens = [int(v) for v in args.tokens.split(",") if v]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens: comma-separated counts of at least 1, got {args.tokens!r}")
    commit = base_package(args.base)
    import numba
    from bench import machine_info

    from purelm.backends.numba_backend import NumbaBackend
    from purelm_base.backends.numba_backend import NumbaBackend as BaseBackend

    backends = {"base": BaseBackend(args.threads), "new": NumbaBackend(args.threads)}
    result = {"base": args.base, "base_commit": commit, "threads": args.threads, "rounds": args.rounds,
              "cache_type": args.cache_type,
              "machine": machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "products" in tests:
        numba.set_num_threads(args.threads)
        result["products"] = products(backends, argparse.Namespace(**dict(vars(args), rounds=max(args.rounds, 30))))
    model = [t for t in tests if t != "products"]
    if model:
        result.update(model_tests(backends, args, model))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
