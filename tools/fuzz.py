"""Fuzz purelm with hostile model files: the long run.

    python tools/fuzz.py --seeds tests/fixtures/*.gguf --cases 100000 --workers 2 --out /tmp/fuzz-out
    python tools/fuzz.py --hparams 10000 --out /tmp/fuzz-hparams       # every hyperparameter x extreme value
    python tools/fuzz.py --struct 20000 --out /tmp/fuzz-struct          # key/value and tensor-info mutants only
    python tools/fuzz.py --seeds ~/.cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf --cases 2000
    python tools/fuzz.py --target gguf-parse --cases 100000             # the reader alone
    python tools/fuzz.py --target legacy-load+generate --cases 5000     # ggml/ggmf/ggjt files (tests/fixtures/legacy)
    python tools/fuzz.py --target session-load+generate --cases 100000  # purelm session files (--load-session)
    python tools/fuzz.py --replay /tmp/fuzz-out                         # run the saved failures again
    python tools/fuzz.py --replay /tmp/fuzz-out/crash --workers 1       # ... in order, in one worker

A crash that does not happen again when its case runs alone is saved with the worker's previous cases
(<case>-prev<k>-*.gguf, oldest first): replay that folder with --workers 1 to run them in order.

Each case runs in a worker process (a crash kills a worker, not the run). Failing inputs (crash, hang,
traceback, oom) are saved under OUT/<outcome>/<case>.gguf with a .json beside it; OUT/report.json has the
counts by outcome and by exception class, the rate and the list of saved inputs. The same --seed and
seed files give the same cases. Exit status 1 when anything failed. The machinery is tests/fuzzlib.py.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fuzzlib  # noqa: E402
from tqdm import tqdm  # noqa: E402


def default_seeds(fmt: str = "gguf") -> list[str]:
    if fmt == "ggml":  # the legacy containers (tools/write_ggml_legacy.py)
        return sorted(glob.glob(str(ROOT / "tests/fixtures/legacy/*.bin")))
    if fmt == "session":  # session files of the fixture model the target loads them into
        return fuzzlib.session_seeds(tempfile.mkdtemp(prefix="purelm-sessions-"))
    return sorted(p for p in glob.glob(str(ROOT / "tests/fixtures/*.gguf")) if not Path(p).name.startswith("tok_"))


def dot_only_seed(folder: str | os.PathLike) -> str:
    """Writes a GGUF holding one 64x256 matrix of each type that only the int16 kernels read
    (packing.DOT_ONLY_TYPES: Q2_K, Q3_K, IQ4_NL, IQ4_XS; no fixture holds them) into `folder`: the
    backend-matvec target's mutants of it reach those kernels and their entry checks. Returns its path."""
    import numpy as np

    from purelm.backends.numba_kernels.packing import DOT_ONLY_TYPES
    from purelm.formats.gguf import GGUFWriter
    from purelm.quant import quantize

    path = Path(folder) / "dot-only-kernels.gguf"
    w = GGUFWriter(path)
    w.add("general.architecture", "llama")
    rng = np.random.default_rng(0)
    for qtype in sorted(DOT_ONLY_TYPES, key=int):
        x = rng.standard_normal((64, 256)).astype(np.float32)
        w.add_tensor(f"{qtype.name.lower()}.weight", quantize(x, qtype), qtype, (64, 256))
    w.write()
    return str(path)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def make_runner(args: argparse.Namespace, target: str, warm: list[str]) -> fuzzlib.Runner:
    out = Path(args.out)
    return fuzzlib.Runner(target, workers=args.workers, backend=args.backend, threads=args.threads,
                          timeout=args.timeout, rss_limit_mb=args.rss_limit_mb, warm=warm,
                          log_dir=str(out / "logs"), confirm=args.confirm,
                          fresh_backend=args.fresh_backend)


def fuzz(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = fuzzlib.TARGETS[args.target].format
    seed_paths = [os.path.expanduser(s) for s in (args.seeds or default_seeds(fmt))]
    if args.target == "backend-matvec" and not args.seeds:  # the fixtures lack the dot-only types
        seed_paths.append(dot_only_seed(out))
    seeds = []
    for p in seed_paths:
        try:
            seeds.append(fuzzlib.load_seed(p, fmt))
        except (OSError, ValueError) as e:
            print(f"skipping seed {p}: {e}", file=sys.stderr)
    if not seeds:
        sys.exit("no usable seed files")
    n_random = args.cases if args.cases is not None else (0 if args.hparams or args.struct else 1000)
    n_struct = args.struct or 0
    n_hparams = args.hparams or 0
    if fmt != "gguf" and (args.hparams or args.struct):
        sys.exit(f"--hparams and --struct need GGUF seeds; target {args.target} reads {fmt} files")
    total_hp = sum(1 for _ in fuzzlib.hparam_cases(seeds, None, args.seed)) if fmt == "gguf" else 0
    n_hparams = min(n_hparams, total_hp)

    def cases():
        yield from fuzzlib.hparam_cases(seeds, n_hparams, args.seed)
        yield from fuzzlib.random_cases(seeds, n_struct, args.seed, start=args.start, kind="struct")
        yield from fuzzlib.random_cases(seeds, n_random, args.seed, start=args.start, fmt=fmt)

    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    print(f"{len(seeds)} seeds, target {args.target}, {n_hparams} hyperparameter cases (of {total_hp}) + "
          f"{n_struct} structure + {n_random} random cases, {args.workers} workers; starting workers...",
          file=sys.stderr)
    with make_runner(args, args.target, [s.path for s in seeds] if args.warm_seeds else []) as runner:
        runner.wait_ready()
        warm_s = time.monotonic() - t0
        with tqdm(total=n_hparams + n_struct + n_random, unit="case", smoothing=0.05) as bar:
            report = fuzzlib.run_campaign(runner, cases(), str(out), args.keep_per_signature, bar)
        restarts, idle_deaths = runner.restarts, runner.idle_deaths
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "target": args.target, "backend": args.backend, "seed": args.seed, "start": args.start,
        "seeds": [s.path for s in seeds], "workers": args.workers, "threads_per_worker": args.threads,
        "timeout_s": args.timeout, "rss_limit_mb": args.rss_limit_mb,
        "hparam_cases": n_hparams, "hparam_cases_possible": total_hp, "structure_cases": n_struct,
        "random_cases": n_random,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "warmup_seconds": round(warm_s, 2), "worker_restarts": restarts, "workers_died_between_cases": idle_deaths, "purelm_tree": git_state(),
        **report.as_dict(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print(report.summary())
    print(f"{result['cases_per_second']} cases/s; report: {out / 'report.json'}")
    return 1 if report.failures else 0


def replay(args: argparse.Namespace) -> int:
    files = sorted(Path(args.replay).rglob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf files under {args.replay}")
    by_target: dict[str, list[Path]] = {}
    before: dict[str, dict] = {}
    for f in files:
        side = f.with_suffix(".json")
        info = json.loads(side.read_text()) if side.exists() else {}
        before[str(f)] = info
        by_target.setdefault(args.target_given or info.get("target", args.target), []).append(f)
    rows, failures = [], 0
    for target, paths in by_target.items():
        with make_runner(args, target, []) as runner:
            for case, rec in runner.run(fuzzlib.file_cases(paths)):
                old = before[case.path]
                rows.append({"file": case.path, "target": target, "was": old.get("outcome"),
                             "mutations": old.get("mutations"), **{k: v for k, v in rec.items() if k != "log"}})
                failures += rec["outcome"] in fuzzlib.FAILURES
                print(f"{rec['outcome']:12s} (was {old.get('outcome', '?'):9s}) {case.path}: "
                      f"{rec.get('exc', '')} {' '.join(rec.get('message', rec.get('result', '')).split())[:150]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay-report.json").write_text(json.dumps({"command": shlex.join([sys.executable, *sys.argv]),
                                                        "files": rows, "still_failing": failures}, indent=1))
    print(f"{failures} of {len(rows)} still fail; report: {out / 'replay-report.json'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", help="seed files (default: tests/fixtures/*.gguf; for a legacy target "
                                               "tests/fixtures/legacy/*.bin)")
    ap.add_argument("--cases", type=int, help="random mutants to run (default 1000, 0 with --hparams)")
    ap.add_argument("--hparams", type=int, metavar="N",
                    help="hyperparameter-level cases: every {arch}.*/tokenizer.ggml.* key x extreme value/wrong type")
    ap.add_argument("--struct", type=int, metavar="N",
                    help="structure-aware mutants only (key/values, tensor infos): well-formed enough to reach "
                         "the model more often than --cases")
    ap.add_argument("--target", default="model-build+generate", choices=sorted(fuzzlib.TARGETS))
    ap.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    ap.add_argument("--rss-limit-mb", type=float, default=2048, help="resident memory that counts as oom")
    ap.add_argument("--no-confirm", dest="confirm", action="store_false",
                    help="do not run a crashed or hung case again alone (in a fresh worker, a hang with "
                         "fuzzlib.CONFIRM_TIMES the time) to confirm it")
    ap.add_argument("--out", default="/tmp/purelm-fuzz")
    ap.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same cases")
    ap.add_argument("--start", type=int, default=0, help="index of the first random case (to split a run)")
    ap.add_argument("--keep-per-signature", type=int, default=50,
                    help="failing inputs saved per distinct failure (0: every one)")
    ap.add_argument("--fresh-backend", action="store_true", help="a new backend per case (slower)")
    ap.add_argument("--no-warm-seeds", dest="warm_seeds", action="store_false",
                    help="do not run the seeds once when a worker starts")
    ap.add_argument("--replay", metavar="DIR", help="run the .gguf files under DIR again (saved failures)")
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv
    args.target_given = args.target if any(a.split("=")[0] == "--target" for a in given) else None
    return replay(args) if args.replay else fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
