"""purelm against llama.cpp on the same GGUF file, llama-bench style.

For each thread count, every engine runs in its own worker process (so peak RSS, thread pools and BLAS
settings never mix) and is timed on:

  pp   prefill of --pp fixed random token ids in one forward pass, from an empty context
  tg   decode of --tg tokens one at a time (fixed random ids), from an empty context
  st   (asked for, e.g. numba:tg+st) decode of --tg tokens through each engine's streaming API after a
       16-token prompt: sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and detokenizing
       included, end of sequence banned; timed from the first generated token

Tokenization and sampling are excluded. Each test is repeated --reps times, the engines taking turns
within every repetition (A B A B ...) so that noise from other jobs on the machine hits all of them; the
medians are reported. Also measured once per worker: import, load and first-token latency (load plus a
1-token forward in a fresh process) and peak RSS. The memory read bandwidth is measured at the same
thread counts, and decode speed is expressed as a fraction of it.

    python benchmarks/bench.py smollm2
    python benchmarks/bench.py model.gguf --threads 1,2 --engines numba,llama.cpp --reps 5
    python benchmarks/bench.py model.gguf --engines numpy:tg,llama.cpp     # numpy backend: decode only

Prints one JSON document on stdout (progress goes to stderr); see benchmarks/README.md for the fields.
This file imports only the standard library at the top, so the llama.cpp worker can run under another
interpreter (--llama-python) that has llama-cpp-python but not purelm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PURELM_ENGINES = ("numba", "numpy", "torch")  # torch: CUDA when torch sees a GPU, else its CPU device
LLAMA = "llama.cpp"
LLAMA_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # --cache-type -> llama.cpp's ggml_type
ALL_TESTS = ("pp", "tg", "st")
DEFAULT_TESTS = ("pp", "tg")  # st (decode through the streaming API, sampling and detokenizing): asked for


# ------------------------------------------------------------------------------------------ helpers


def _significant(x: float) -> float:
    """Three significant digits: a tiny model's bandwidth fraction must not round to 0."""
    return float(f"{x:.3g}")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_busy_s() -> tuple[float, float] | None:
    """Machine-wide CPU seconds spent busy and stolen by the hypervisor so far (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    return busy / hz, (v[7] if len(v) > 7 else 0) / hz


# Competing processes for --neighbour (one core each; the tests run while they do). "twin" is not a
# snippet: a second worker of the engine being timed decodes over and over meanwhile (run_threads).
NEIGHBOURS = {
    "none": None,
    "spin": "while True:\n    pass\n",
    "stream": "import numpy as np\na = np.ones(64 << 20, np.float32)\nwhile True:\n    a.sum()\n",
    "twin": None,
}


def start_neighbour(kind: str) -> subprocess.Popen | None:
    code = NEIGHBOURS[kind]
    if code is None:
        return None
    return subprocess.Popen([sys.executable, "-c", code], env=thread_env(1), stdout=subprocess.DEVNULL)


def thread_env(threads: int) -> dict[str, str]:
    """The environment of an engine's process: `threads` for every thread pool, and Python's bytecode
    written as it is for a pip-installed package (pip compiles it at install), so that an environment
    with PYTHONDONTWRITEBYTECODE set does not time the compile of every module at each start."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
              "PURELM_NUM_THREADS"):
        env[k] = str(threads)
    return env


def parse_engines(spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """'numba,numpy:tg,llama.cpp' -> [(engine, tests)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, tests = item.partition(":")
        name = {"llama_cpp": LLAMA, "llama": LLAMA, "llamacpp": LLAMA}.get(name.lower(), name.lower())
        if name not in (*PURELM_ENGINES, LLAMA):
            raise SystemExit(f"unknown engine {name!r} (choose from numba, numpy, torch, llama.cpp)")
        chosen = tuple(t for t in ALL_TESTS if t in tests.split("+")) if tests else DEFAULT_TESTS
        if not chosen:
            raise SystemExit(f"engine {item!r}: tests must be pp, tg, st or a mix joined by + (pp+tg+st)")
        out.append((name, chosen))
    return out


# ------------------------------------------------------------------------------------------ worker
# `bench.py --worker ENGINE ...` loads one engine and answers JSON commands, one a line, on stdin.
# Its protocol goes to a private copy of stdout; fd 1 is pointed at stderr so that library chatter
# cannot corrupt it.


class PurelmEngine:
    def __init__(self, backend: str, path: str, threads: int, n_ctx: int, cache_type: str | None = None,
                 lora: str | None = None) -> None:
        t0 = time.perf_counter()
        import numpy as np

        self.np = np
        from purelm.backends import get_backend
        from purelm.formats.gguf import GGUFFile
        from purelm.models import build_model

        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(threads)  # BLAS pools (numpy matmul)
        except ImportError:
            self._limits = None
        self.import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.backend = get_backend(backend, threads)
        self.rss_runtime_mb = rss_mb()  # interpreter, numpy and the backend's imports: before any model
        self.file = GGUFFile(path)
        from purelm.lora import load_adapter

        self.model = build_model(self.file, self.backend, [load_adapter(lora, self.file)] if lora else ())
        if cache_type:
            self.model.cache_type_k = self.model.cache_type_v = cache_type
        self.cache = self.model.new_cache(n_ctx)
        self.tokenizer = None  # built for the st test only (not part of the load time)
        self.load_s = time.perf_counter() - t0
        c = self.cache  # its size once all n_ctx positions are used (it grows on demand)
        itemsize = c.k[0].element_size() if hasattr(c.k[0], "element_size") else c.k[0].itemsize
        self.kv_cache_mb = c.n_layers * n_ctx * c.n_kv_heads * (c.k[0].shape[-1] + c.v[0].shape[-1]) * itemsize / 2**20

    def reset(self) -> None:
        self.cache.truncate(0)

    def eval(self, ids: list[int]) -> None:
        self.model.forward(self.np.asarray(ids, self.np.int64), self.cache)

    def stream(self, prompt: list[int], n: int) -> float:
        """Seconds from the first generated token to the n-th through the streaming API (sampling,
        detokenizing: what a user's `purelm generate` runs)."""
        from purelm.generate import stream_tokens
        from purelm.sampling import SamplingParams
        from purelm.tokenizer import Tokenizer

        if self.tokenizer is None:
            self.tokenizer = Tokenizer.from_gguf_metadata(self.file.metadata, path=self.file.path)
        params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=0)
        return _timed_stream(c.token for c in stream_tokens(self.model, self.tokenizer, self.cache, prompt, params,
                                                             n, ignore_eos=True) if c.token is not None)

    def info(self) -> dict:
        import numpy as np

        info = {"backend": getattr(self.backend, "name", type(self.backend).__name__), "numpy": np.__version__}
        torch = sys.modules.get("torch")
        if torch is not None and getattr(self.backend, "device", None) is not None:
            info.update(torch=torch.__version__, device=str(self.backend.device), dtype=str(self.backend.dtype))
            if self.backend.device.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(self.backend.device)
                info["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        numba = sys.modules.get("numba")  # not imported here: that would inflate the numpy engine's RSS
        if numba is not None:
            info["numba"] = numba.__version__
            try:
                info["numba_threading_layer"] = numba.threading_layer()
            except ValueError:  # no parallel region has run yet
                info["numba_threading_layer"] = None
            info["numba_num_threads"] = numba.get_num_threads()
        try:
            from threadpoolctl import threadpool_info

            info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                            for p in threadpool_info()]
        except ImportError:
            pass
        return info


class LlamaEngine:
    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int, extra_bufts: bool,
                 cache_type: str | None = None, lora: str | None = None) -> None:
        t0 = time.perf_counter()
        import llama_cpp

        self.llama_cpp = llama_cpp
        if not extra_bufts:  # no weight repacking (nor AMX): see --llama-extra-bufts
            import llama_cpp.llama_cpp as low  # what llama_cpp.Llama calls

            default = low.llama_model_default_params

            def params():
                p = default()
                p.use_extra_bufts = False
                return p

            low.llama_model_default_params = params
        self.import_s = time.perf_counter() - t0
        self.rss_runtime_mb = rss_mb()
        self.kv_cache_mb = None  # (llama.cpp's f16 cache: not needed, the bound is checked for purelm)
        t0 = time.perf_counter()
        kv = {} if not cache_type else {"type_k": LLAMA_CACHE_TYPES[cache_type], "type_v": LLAMA_CACHE_TYPES[cache_type]}
        if cache_type == "q8_0":  # llama.cpp keeps a quantized V cache only with flash attention
            kv["flash_attn"] = True
        if lora:
            kv["lora_path"] = lora
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, verbose=False, **kv)
        self.load_s = time.perf_counter() - t0
        self.extra_bufts = extra_bufts

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the KV cache from position 0 on

    def eval(self, ids: list[int]) -> None:
        self.llm.eval(ids)

    def stream(self, prompt: list[int], n: int) -> float:
        """As PurelmEngine.stream, through llama-cpp-python's create_completion(stream=True) with the
        same sampling (end of sequence banned by a logit bias, as purelm's ignore_eos)."""
        eos = self.llm.token_eos()
        chunks = self.llm.create_completion(prompt, max_tokens=n, stream=True, temperature=0.8, top_k=40,
                                            top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=0,
                                            logit_bias={eos: -1e9} if eos >= 0 else None)
        return _timed_stream(chunks)

    def info(self) -> dict:
        lc = self.llama_cpp
        return {"llama_cpp": lc.__version__, "system_info": lc.llama_print_system_info().decode().strip(),
                "lib_path": os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(lc.__file__).parent / "lib"),
                "use_extra_bufts": self.extra_bufts}


def _timed_stream(items) -> float:
    """Seconds from the first item to the last (the prompt's prefill before the first is not timed)."""
    t0 = None
    for _ in items:
        if t0 is None:
            t0 = time.perf_counter()
    return time.perf_counter() - t0


def worker_main(args: argparse.Namespace) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")

    t_start = time.perf_counter()
    try:
        if args.worker == LLAMA:
            eng = LlamaEngine(args.model, args.threads, args.n_ctx, args.n_batch, args.extra_bufts == "on",
                              args.cache_type, args.lora)
        else:
            eng = PurelmEngine(args.worker, args.model, args.threads, args.n_ctx, args.cache_type, args.lora)
        t0 = time.perf_counter()
        eng.reset()
        eng.eval([args.first_id])
        first = time.perf_counter() - t0
        send({"ready": True, "import_s": eng.import_s, "load_s": eng.load_s, "first_forward_s": first,
              "first_token_s": eng.load_s + first, "cold_start_s": time.perf_counter() - t_start,
              "rss_after_load_mb": rss_mb(), "rss_runtime_mb": eng.rss_runtime_mb,
              "kv_cache_mb": eng.kv_cache_mb, "info": eng.info()})
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        try:
            if op == "quit":
                send({"ok": True, "peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()})
                return 0
            if op == "stats":
                send({"ok": True, "peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()})
                continue
            ids = cmd["ids"]
            eng.reset()
            if op == "pp":
                t0 = time.perf_counter()
                eng.eval(ids)
                dt = time.perf_counter() - t0
            elif op == "tg":
                t0 = time.perf_counter()
                for i in ids:
                    eng.eval([i])
                dt = time.perf_counter() - t0
            elif op == "st":  # tokens 2..n+1 after a 16-token prompt: n intervals
                dt = eng.stream(ids[:16], len(ids) + 1)
            else:
                raise ValueError(f"unknown command {op!r}")
            eng.reset()
            send({"ok": True, "s": dt})
        except Exception as e:  # noqa: BLE001
            send({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


# ------------------------------------------------------------------------------------------ parent side


class Worker:
    """A worker process for one engine at one thread count."""

    def __init__(self, engine: str, args: argparse.Namespace, threads: int, n_ctx: int, first_id: int,
                 extra_bufts: str) -> None:
        self.engine, self.threads = engine, threads
        python = args.llama_python if engine == LLAMA and args.llama_python else sys.executable
        cmd = [python, str(HERE), "--worker", engine, "--model", str(args.model_path), "--threads", str(threads),
               "--n-ctx", str(n_ctx), "--n-batch", str(args.n_batch), "--first-id", str(first_id),
               "--llama-extra-bufts", extra_bufts]
        if getattr(args, "cache_type", None):
            cmd += ["--cache-type", args.cache_type]
        if getattr(args, "lora", None):
            cmd += ["--lora", str(Path(args.lora).resolve())]
        env = thread_env(threads)
        if engine == LLAMA and args.llama_lib:
            env["LLAMA_CPP_LIB_PATH"] = args.llama_lib
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, bufsize=1, env=env)
        try:
            import psutil

            self.ps = psutil.Process(self.proc.pid)
        except (ImportError, OSError):
            self.ps = None
        self.hello = self._read()

    def cpu_s(self) -> float | None:
        """CPU seconds the worker has used (all its threads)."""
        try:
            t = self.ps.cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 (no psutil, or the worker is gone)
            return None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"ok": False, "ready": False, "error": f"worker died (exit code {self.proc.returncode}): "
                    f"{self.stderr_tail()}"}
        return json.loads(line)

    def stderr_tail(self, n: int = 600) -> str:
        self.err.seek(0)
        return self.err.read()[-n:].strip()

    def ask(self, **cmd) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"worker has exited (code {self.proc.returncode})"}
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self._read()

    def close(self) -> dict:
        out = self.ask(cmd="quit") if self.proc.poll() is None else {}
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()
        return out


def probe_llama(args: argparse.Namespace) -> tuple[str, str | None]:
    """Some llama.cpp builds crash on batched evaluation (e.g. AMX tiles that a VM does not enable).
    Try a 2-token eval in a throwaway process; on a crash, fall back to use_extra_bufts=False."""
    if args.llama_extra_bufts != "auto":
        return args.llama_extra_bufts, None
    code = ("import sys, llama_cpp\n"
            "m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, verbose=False)\n"
            "m.eval([1, 2, 3, 4])\n")
    env = dict(os.environ)
    if args.llama_lib:
        env["LLAMA_CPP_LIB_PATH"] = args.llama_lib
    python = args.llama_python or sys.executable
    r = subprocess.run([python, "-c", code, str(args.model_path)], capture_output=True, text=True, env=env)
    if r.returncode >= 0:  # fine, or a Python error (no llama_cpp...) that the worker will report
        return "on", None
    note = (f"llama.cpp crashed on a batched eval with its default weight buffers (exit code {r.returncode}); "
            "ran it with use_extra_bufts=False (no weight repacking / AMX), which understates llama.cpp. "
            "Point --llama-lib at a build without the crashing feature (e.g. GGML_AMX_INT8=OFF) to avoid this.")
    log("bench: " + note)
    return "off", note


def bandwidth_worker(args: argparse.Namespace) -> int:
    """Read bandwidth: the maximum of a float32 buffer, in `threads` threads at once (numpy's SIMD
    max releases the GIL and does one compare per float: the loads are the limit), best and median of
    several passes. (Sums are compute-bound on an AMD EPYC VM: a numba prange float32 sum read 5 GB/s
    a thread, numpy's pairwise sum 24, its max 39.)"""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    sizes = [int(s) for s in args.bandwidth_sizes.split(",") if s]
    out = {}
    pool = ThreadPoolExecutor(args.threads)
    method = f"numpy float32 max of {args.threads * 4} chunks in {args.threads} thread(s)"

    def run(a):
        return max(pool.map(np.max, np.array_split(a, args.threads * 4)))

    for nbytes in sizes:
        a = np.ones(max(1, nbytes // 4), np.float32)
        passes = max(5, min(50, (8 << 30) // max(a.nbytes, 1)))  # ~8 GB read per size
        run(a)
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            run(a)
            times.append(time.perf_counter() - t0)
        out[str(nbytes)] = {"bytes": a.nbytes, "passes": passes,
                            "gb_s_best": a.nbytes / min(times) / 1e9,
                            "gb_s_median": a.nbytes / statistics.median(times) / 1e9}
        del a
    print(json.dumps({"method": method, "sizes": out}))
    return 0


def measure_bandwidth(args: argparse.Namespace, threads: int, model_bytes: int) -> dict:
    sizes = [args.bandwidth_mb << 20]
    if model_bytes >= 16 << 20 and args.bandwidth_model_size:  # smaller ones: thread start-up dominates
        sizes.append(int(model_bytes))
    cmd = [sys.executable, str(HERE), "--bandwidth-worker", "--threads", str(threads),
           "--bandwidth-sizes", ",".join(map(str, sizes))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if r.returncode != 0:
        return {"error": r.stderr[-600:]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    by_size = res["sizes"]
    out = {"method": res["method"], "buffer_mb": args.bandwidth_mb,
           "gb_s": by_size[str(sizes[0])]["gb_s_best"], "gb_s_median": by_size[str(sizes[0])]["gb_s_median"]}
    if len(sizes) > 1:
        m = by_size[str(sizes[1])]
        out.update(model_size_buffer_mb=round(sizes[1] / 2**20, 1), model_size_gb_s=m["gb_s_best"],
                   model_size_gb_s_median=m["gb_s_median"])
    return out


def machine_info() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        cpu = platform.processor()
    info["cpu"] = cpu
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    info["logical_cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Core(s) per socket", "Thread(s) per core", "Socket(s)", "L2 cache", "L3 cache",
                             "Hypervisor vendor"):
                info[k.strip().lower().replace("(s)", "s").replace(" ", "_")] = v.strip()
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
        info["psutil"] = psutil.__version__
    except ImportError:
        pass
    for var in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "NUMBA_THREADING_LAYER", "LLAMA_CPP_LIB_PATH"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    for mod in ("numpy", "numba", "llama_cpp", "purelm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def model_info(path: Path) -> dict:
    from collections import Counter

    from purelm.formats.gguf import GGUFFile

    g = GGUFFile(path)
    ts = g.tensors
    tied = "output.weight" not in ts
    # Weight bytes a decode step reads: every matrix once (the embedding only as the tied output head)
    # and the 1-D norms; one embedding row is negligible.
    per_token = sum(t.nbytes for n, t in ts.items() if n != "token_embd.weight")
    if tied and "token_embd.weight" in ts:
        per_token += ts["token_embd.weight"].nbytes
    md = g.metadata
    arch = g.architecture
    n_vocab = ts["token_embd.weight"].shape[0] if "token_embd.weight" in ts else int(md.get(f"{arch}.vocab_size", 0))
    return {"path": str(path), "name": md.get("general.name"), "architecture": arch,
            "file_bytes": g.file_size, "file_mb": round(g.file_size / 2**20, 1),
            "params": sum(t.n_elements for t in ts.values()),
            "tensor_types": dict(Counter(t.type.name for t in ts.values())),
            "n_vocab": n_vocab, "n_layer": md.get(f"{arch}.block_count"),
            "n_embd": md.get(f"{arch}.embedding_length"), "tied_embeddings": tied,
            "weight_bytes_per_token": per_token, "bos_id": md.get("tokenizer.ggml.bos_token_id")}


def summarize(times: list[float], n_tokens: int, loads: list[float | None] | None = None,
              quiet_load: float = 0.25) -> dict:
    rates = [n_tokens / t for t in times]
    out = {"tok_s": round(statistics.median(rates), 2), "tok_s_reps": [round(r, 2) for r in rates],
           "tok_s_best": round(max(rates), 2),
           "tok_s_stdev": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
           "s_median": round(statistics.median(times), 4), "n_tokens": n_tokens}
    if loads and all(x is not None for x in loads):
        out["other_load_reps"] = [round(x, 2) for x in loads]
        quiet = [r for r, x in zip(rates, loads) if x < quiet_load]
        out["tok_s_quiet"] = round(statistics.median(quiet), 2) if quiet else None
        out["n_quiet"] = len(quiet)
    return out


def warm_file(path: Path) -> None:
    """Read the file once so that every engine's load finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def run(args: argparse.Namespace) -> dict:
    import random

    model = model_info(args.model_path)
    engines = parse_engines(args.engines)
    threads_list = [int(t) for t in str(args.threads).split(",") if t]
    n_ctx = args.n_ctx or max(args.pp + args.tg, args.pp + 1, 64)
    rng = random.Random(args.seed)
    n_vocab = model["n_vocab"]
    lo = min(n_vocab - 1, 3)  # skip the usual special ids; any id does for timing
    pp_ids = [rng.randrange(lo, n_vocab) for _ in range(args.pp)]
    tg_ids = [rng.randrange(lo, n_vocab) for _ in range(args.tg)]
    first_id = int(model["bos_id"] if model["bos_id"] is not None and model["bos_id"] < n_vocab else pp_ids[0])

    report: dict = {"machine": machine_info(), "model": model,
                    "settings": {"threads": threads_list, "engines": [f"{e}:{'+'.join(t)}" for e, t in engines],
                                 "pp": args.pp, "tg": args.tg, "reps": args.reps, "warmup": args.warmup,
                                 "cache_type": args.cache_type, "lora": args.lora, "n_ctx": n_ctx, "n_batch_llama": args.n_batch, "seed": args.seed,
                                 "order": "engines alternate within each repetition (A B A B)",
                                 "page_cache": "warm (file read once before the workers start)"},
                    "bandwidth": {}, "results": [], "ratios": [], "notes": []}
    extra = "on"
    if any(e == LLAMA for e, _ in engines):
        extra, note = probe_llama(args)
        if note:
            report["notes"].append(note)
    warm_file(args.model_path)
    if not args.no_bandwidth:
        for threads in threads_list:
            log(f"bench: measuring read bandwidth at {threads} thread(s)")
            report["bandwidth"][str(threads)] = measure_bandwidth(args, threads, model["weight_bytes_per_token"])
        # More threads cannot lower the real limit; a lower reading is noise (another job on a core).
        for threads in threads_list:
            bw = report["bandwidth"][str(threads)]
            fewer = [report["bandwidth"][str(t)] for t in threads_list if t <= threads]
            for key in ("gb_s", "model_size_gb_s"):
                vals = [b[key] for b in fewer if b.get(key)]
                if vals:
                    bw[key + "_limit"] = max(vals)

    if args.neighbour != "none":
        report["notes"].append(f"--neighbour {args.neighbour}: a competing process ran during the tests "
                               "(its CPU shows in other_load_reps)")
    for threads in threads_list:
        neighbour = start_neighbour(args.neighbour)
        try:
            run_threads(args, report, model, engines, threads, n_ctx, first_id, extra, pp_ids, tg_ids)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def run_threads(args: argparse.Namespace, report: dict, model: dict, engines: list, threads: int, n_ctx: int,
                first_id: int, extra: str, pp_ids: list[int], tg_ids: list[int]) -> None:
    """Every engine at one thread count: start the workers, warm up, then the timed runs, alternating."""
    workers: dict[str, Worker] = {}
    results: dict[str, dict] = {}
    for engine, tests in engines:
        log(f"bench: starting {engine} with {threads} thread(s)")
        w = Worker(engine, args, threads, n_ctx, first_id, extra)
        res = {"engine": engine, "threads": threads, "tests": list(tests)}
        if not w.hello.get("ready"):
            res["error"] = w.hello.get("error")
            log(f"bench: {engine} unavailable: {res['error']}")
            w.close()
        else:
            for k in ("import_s", "load_s", "first_forward_s", "first_token_s", "cold_start_s",
                      "rss_after_load_mb", "rss_runtime_mb", "kv_cache_mb"):
                if w.hello.get(k) is not None:
                    res[k] = round(w.hello[k], 4)
            res["info"] = w.hello["info"]
            workers[engine] = w
        results[engine] = res
    live = [(e, t) for e, t in engines if e in workers]
    twins: dict[str, Worker] = {}
    twin_runs: dict[str, int] = {}
    if args.neighbour == "twin":  # the same engine, threads and file, decoding while each run goes
        for engine, _ in live:
            twin = Worker(engine, args, threads, n_ctx, first_id, extra)
            if twin.hello.get("ready"):
                twins[engine] = twin
            else:
                raise SystemExit(f"bench: {engine}'s twin failed to start: {twin.hello.get('error')}")

    def step(engine: str, test: str) -> tuple[float, float | None] | None:
        """Seconds of one run, and the other jobs' load meanwhile (cores they kept busy or
        the hypervisor stole, on average; None where it cannot be measured)."""
        ids = pp_ids if test == "pp" else tg_ids
        w = workers[engine]
        stop, busy = threading.Event(), None
        if engine in twins:
            def decode_until_stopped(twin: Worker = twins[engine]) -> None:
                while not stop.is_set():
                    if twin.ask(cmd="tg", ids=tg_ids).get("ok"):
                        twin_runs[engine] = twin_runs.get(engine, 0) + 1
            busy = threading.Thread(target=decode_until_stopped, daemon=True)
            busy.start()
            time.sleep(1.0)  # (the twin past its first tokens, as a neighbour already running would be)
        b0, c0, p0, t0 = cpu_busy_s(), w.cpu_s(), time.process_time(), time.perf_counter()
        r = w.ask(cmd=test, ids=ids)
        b1, c1, p1, wall = cpu_busy_s(), w.cpu_s(), time.process_time(), time.perf_counter() - t0
        if busy is not None:
            stop.set()
            busy.join()
        if not r.get("ok"):
            results[engine].setdefault("errors", []).append(f"{test}: {r.get('error')}")
            log(f"bench: {engine} {test} failed: {r.get('error')}")
            return None
        foreign = None
        if b0 and b1 and c0 is not None and c1 is not None and wall >= 0.2:  # /proc/stat ticks: 10 ms
            other = (b1[0] - b0[0]) - (c1 - c0) - (p1 - p0) + (b1[1] - b0[1])
            foreign = max(0.0, other / wall)
        return r["s"], foreign

    # warm-up: JIT compilation, first-touch of weights and buffers; not timed
    for _ in range(args.warmup):
        for test in ALL_TESTS:
            for engine, tests in live:
                if test in tests:
                    step(engine, test)
    times: dict[tuple[str, str], list[float]] = {}
    loads: dict[tuple[str, str], list[float | None]] = {}
    for rep in range(args.reps):
        for test in ALL_TESTS:
            for engine, tests in live:
                if test not in tests or workers[engine].proc.poll() is not None:
                    continue
                got = step(engine, test)
                if got is not None:
                    s, foreign = got
                    times.setdefault((engine, test), []).append(s)
                    loads.setdefault((engine, test), []).append(foreign)
                    n = args.pp if test == "pp" else args.tg
                    other = f"  (other load {foreign:.2f} cores)" if foreign is not None else ""
                    log(f"bench: t={threads} rep {rep + 1}/{args.reps} {engine:9s} {test}{n}: "
                        f"{n / s:9.2f} tok/s{other}")
    for engine, tests in live:
        res = results[engine]
        for test in tests:
            if (engine, test) in times:
                res[test] = summarize(times[(engine, test)], args.pp if test == "pp" else args.tg,
                                      loads[(engine, test)], args.quiet_load)
        if engine in twins:
            twins[engine].close()
            res["twin_runs"] = twin_runs.get(engine, 0)  # the twin's decodes, warm-up and timed runs
        final = workers[engine].close()
        if final.get("ok"):
            res["peak_rss_mb"] = round(final["peak_rss_mb"], 1)
            if res.get("kv_cache_mb") is not None:
                # the bound purelm is held to: 1.2 x the file + the KV cache at n_ctx (MiB)
                bound = 1.2 * model["file_bytes"] / 2**20 + res["kv_cache_mb"]
                res["peak_rss_bound_mb"] = round(bound, 1)
                res["peak_rss_within_bound"] = res["peak_rss_mb"] <= bound
                res["peak_rss_above_runtime_mb"] = round(res["peak_rss_mb"] - res["rss_runtime_mb"], 1)
        bw = report["bandwidth"].get(str(threads), {})
        for test in ("tg", "st"):
            if test in res and bw.get("gb_s_limit"):
                achieved = model["weight_bytes_per_token"] * res[test]["tok_s"] / 1e9
                res[f"{test}_weight_gb_s"] = _significant(achieved)
                res[f"{test}_bandwidth_fraction"] = _significant(achieved / bw["gb_s_limit"])
                if bw.get("model_size_gb_s_limit"):
                    res[f"{test}_bandwidth_fraction_model_size"] = _significant(
                        achieved / bw["model_size_gb_s_limit"])
    report["results"] += [results[e] for e, _ in engines]

    ref = results.get(LLAMA)
    if ref and "error" not in ref:
        for engine, _ in engines:
            r = results[engine]
            if engine == LLAMA or "error" in r:
                continue
            ratio = {"engine": engine, "vs": LLAMA, "threads": threads}
            for test in ALL_TESTS:  # speed: purelm / llama.cpp, above 1 = purelm faster
                if test in r and test in ref:
                    ratio[f"{test}_speed"] = round(r[test]["tok_s"] / ref[test]["tok_s"], 3)
                    if r[test].get("tok_s_quiet") and ref[test].get("tok_s_quiet"):
                        ratio[f"{test}_speed_quiet"] = round(r[test]["tok_s_quiet"] / ref[test]["tok_s_quiet"], 3)
            for k in ("load_s", "first_token_s", "peak_rss_mb"):  # cost: above 1 = purelm costlier
                if r.get(k) and ref.get(k):
                    ratio[k] = round(r[k] / ref[k], 3)
            report["ratios"].append(ratio)


def resolve_model(name: str) -> Path:
    p = Path(name).expanduser()
    if p.exists():
        return p
    from purelm.hub import resolve

    return Path(resolve(name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model", nargs="?", help="a .gguf path or a known model name (smollm2)")
    ap.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--engines", default="numba,llama.cpp",
                    help="comma-separated: numba, numpy, llama.cpp; suffix :pp, :tg, :st or a mix (pp+tg+st) to "
                         "run those tests (default pp+tg; st: decode through the streaming API with sampling and "
                         "detokenizing, --tg tokens; numpy is slow, e.g. numpy:tg)")
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens for the prefill test (default 512)")
    ap.add_argument("--tg", type=int, default=128, help="tokens for the decode test (default 128)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each test (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each test first (default 1)")
    ap.add_argument("--n-ctx", type=int, default=0, help="context size (default pp + tg)")
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement")
    ap.add_argument("--bandwidth-mb", type=int, default=1024, help="bandwidth buffer size (default 1024 MiB)")
    ap.add_argument("--no-bandwidth-model-size", dest="bandwidth_model_size", action="store_false",
                    help="skip the second bandwidth measurement with a buffer the size of the weights")
    ap.add_argument("--llama-python", help="interpreter for the llama.cpp worker (default: this one)")
    ap.add_argument("--llama-lib", help="LLAMA_CPP_LIB_PATH for the llama.cpp worker (another libllama build)")
    ap.add_argument("--llama-extra-bufts", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's extra weight buffers (repacking, AMX): auto = on unless a probe crashes")
    ap.add_argument("--quiet-load", type=float, default=0.25,
                    help="a rep counts as quiet when other jobs kept fewer cores busy than this (default 0.25)")
    ap.add_argument("--neighbour", choices=sorted(NEIGHBOURS), default="none",
                    help="run a competing process during the tests, to see how each engine copes with a "
                         "busy machine: spin (one core busy in a loop), stream (one core reading a 256 MiB "
                         "array over and over: memory bandwidth), twin (a second worker of the engine being "
                         "timed, same file and threads, decoding over and over); default none")
    ap.add_argument("--cache-type", choices=sorted(LLAMA_CACHE_TYPES), default=None,
                    help="both engines' KV cache type (default: each engine's own, purelm f32, llama.cpp f16)")
    ap.add_argument("--lora", metavar="FILE", help="both engines apply this LoRA adapter at scale 1 "
                    "(make_synthetic.py --lora-for makes one); llama-cpp-python then reads the model without mmap")
    ap.add_argument("--out", help="also write the JSON here")
    # internal
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth-sizes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--first-id", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or args.model_opt

    if args.bandwidth_worker:
        args.threads = int(args.threads)
        return bandwidth_worker(args)
    if args.worker:
        args.threads = int(args.threads)
        args.extra_bufts = args.llama_extra_bufts
        return worker_main(args)
    if not args.model:
        ap.error("give a .gguf path or a model name")
    if args.pp < 1 or args.tg < 1 or args.reps < 1:
        ap.error("--pp, --tg and --reps must be at least 1")
    args.model_path = resolve_model(args.model)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
