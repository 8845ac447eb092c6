"""Embeddings: purelm against llama.cpp on the same BERT file and threads. Prints JSON.

    python benchmarks/make_synthetic.py /tmp/bert-synth-f16.gguf --bert
    python benchmarks/embed_bench.py /tmp/bert-synth-f16.gguf --threads 1,2 --reps 5 --llama-lib DIR

Each engine runs in its own worker process at each thread count (llama.cpp through llama-cpp-python's
`Llama(embedding=True).embed`, which packs several texts into one batch of up to 512 tokens; purelm
through `LLM.embed`), and the two take turns within every repetition; medians are reported. A workload
is a list of texts of made-up words of the file's vocabulary (one token a word, plus [CLS] and [SEP]):
"queries" (64 texts of 16 tokens), "passages" (32 of 128) and "long" (4 of 512). The timed call
tokenizes, runs the model and pools, as a user's call does; one untimed call of each workload comes
first. The embeddings of the two engines are compared too (cosine of each pair).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (machine facts, thread settings)
from make_synthetic import BERT_SPECIALS, bert_word  # noqa: E402

WORKLOADS = {"queries": (64, 16), "passages": (32, 128), "long": (4, 512)}  # texts, tokens each
LLAMA = "llama.cpp"


def texts(n: int, tokens: int, start: int = 0) -> list[str]:
    """n texts of tokens - 2 words each ([CLS] and [SEP] make the rest): word starts of the vocabulary."""
    words = (bert_word(i) for i in range(start, 10**9) if i % 4)  # (every fourth entry is a continuation)
    return [" ".join(next(words) for _ in range(tokens - 2)) for _ in range(n)]


def worker_main(args: argparse.Namespace) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    try:
        if args.worker == LLAMA:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=args.model, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                                  n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

            def embed(batch: list[str]) -> list:
                return llm.embed(batch, normalize=True)

            def count(text: str) -> int:
                return len(llm.tokenize(text.encode()))
        else:
            import purelm

            llm = purelm.load(args.model, backend=args.worker, threads=args.threads, n_ctx=512)

            def embed(batch: list[str]) -> list:
                return llm.embed(batch).tolist()

            def count(text: str) -> int:
                return len(llm.tokenize(text))
        hello = {"ready": True, "load_s": time.perf_counter() - t0}
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        hello = {"ready": False, "error": f"{type(e).__name__}: {e}"}
    proto.write(json.dumps(hello) + "\n")
    if not hello["ready"]:
        return 1
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return 0
        try:
            batch = cmd["texts"]
            t0 = time.perf_counter()
            vectors = embed(batch)
            s = time.perf_counter() - t0
            proto.write(json.dumps({"ok": True, "s": s, "tokens": sum(map(count, batch)),
                                    "first": vectors[0], "last": vectors[-1]}) + "\n")
        except Exception as e:  # noqa: BLE001
            proto.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
    return 0


class Worker:
    def __init__(self, engine: str, args: argparse.Namespace, threads: int) -> None:
        self.engine = engine
        env = bench.thread_env(threads)
        if engine == LLAMA and args.llama_lib:
            env["LLAMA_CPP_LIB_PATH"] = args.llama_lib
        python = args.llama_python if engine == LLAMA and args.llama_python else sys.executable
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([python, __file__, "--worker", engine, "--model", str(args.model),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1, env=env)
        self.hello = self._read()
        if not self.hello.get("ready"):
            raise SystemExit(f"{engine} failed to start: {self.hello.get('error')}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise SystemExit(f"{self.engine} worker died: {self.err.read()[-800:]}")
        return json.loads(line)

    def embed(self, batch: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "embed", "texts": batch}) + "\n")
        out = self._read()
        if not out.get("ok"):
            raise SystemExit(f"{self.engine}: {out.get('error')}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(30)


def cosine(a: list[float], b: list[float]) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_threads(args: argparse.Namespace, threads: int) -> dict:
    engines = ["numba", LLAMA]
    workers = {e: Worker(e, args, threads) for e in engines}
    loads = {e: workers[e].hello["load_s"] for e in engines}
    out: dict = {}
    try:
        for name, (n, tokens) in WORKLOADS.items():
            batch = texts(n, tokens)
            first = {e: workers[e].embed(batch) for e in engines}  # untimed warm-up
            times: dict[str, list[float]] = {e: [] for e in engines}
            for rep in range(args.reps):
                for e in engines:
                    times[e].append(workers[e].embed(batch)["s"])
                bench.log(f"threads {threads} {name} rep {rep + 1}: " + ", ".join(
                    f"{e} {n / times[e][-1]:.1f} texts/s" for e in engines))
            med = {e: statistics.median(times[e]) for e in engines}
            out[name] = {
                "texts": n, "tokens": first["numba"]["tokens"], "llama_cpp_tokens": first[LLAMA]["tokens"],
                **{f"{'purelm' if e == 'numba' else 'llama_cpp'}_texts_per_s": round(n / med[e], 2) for e in engines},
                **{f"{'purelm' if e == 'numba' else 'llama_cpp'}_s": [round(t, 4) for t in times[e]] for e in engines},
                "ratio": round(med[LLAMA] / med["numba"], 3),
                "ratio_reps": [round(b / a, 3) for a, b in zip(times["numba"], times[LLAMA])],
                "cosine_first_last": [round(cosine(first["numba"][k], first[LLAMA][k]), 6) for k in ("first", "last")],
            }
    finally:
        for w in workers.values():
            w.close()
    out["load_s"] = {e: round(v, 3) for e, v in loads.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--llama-lib", help="folder of the libllama build to load (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--llama-python", help="the Python that imports llama_cpp (default: this one)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.model = a.model_opt
        a.threads = int(a.threads)
        return worker_main(a)
    if a.model is None:
        ap.error("give the model file (benchmarks/make_synthetic.py --bert makes one)")
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "model": str(a.model), "model_bytes": a.model.stat().st_size, "machine": bench.machine_info(),
              "workloads": {k: {"texts": n, "tokens_each": t} for k, (n, t) in WORKLOADS.items()},
              "specials": BERT_SPECIALS, "results": {}}
    for threads in (int(t) for t in a.threads.split(",")):
        report["results"][str(threads)] = run_threads(a, threads)
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
