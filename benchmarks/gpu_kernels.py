"""The torch backend's packed product kernels on a CUDA GPU, and where a decode step's time goes.

    python benchmarks/gpu_kernels.py [model.gguf] --out gpu_kernels.json

1. Sweep: for the matrix shapes of a model (the 1.1B's by default: q|k|v, o, gate|up with the fused
   activation, down; Q4_0), each (outputs per program, columns per step, warps) configuration of the
   Triton product is timed in a CUDA graph that cycles through copies of the weights totalling four
   times the GPU's L2 cache (each launch reads its weights from device memory, as in a model's step;
   launch cost aside), for one activation row, for several (2-16: batched decode) and for a prompt's
   512; weight bytes read per second (and multiply-adds per second), and the best configuration per
   shape and row count.
2. With a model file: one decode step replayed from its CUDA graph against the whole step through
   `model.forward` (host work: inputs copied in, logits out), and the step's kernels by device time
   (torch.profiler), so the launch gaps show as the difference; then a 512-token prompt: its wall time
   replayed as a graph, and uncaptured its wall time against its kernels' device time, when the host
   had queued them all, the pass's waits on the GPU, and the host operators that take the most time.
3. Host time per launch (`launch_us`): a product through the backend, the same Triton kernel through
   Triton and called directly, a torch add.
JSON out (--out), a table on stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from purelm.backends.torch_backend import TorchBackend, triton_kernels  # noqa: E402
from purelm.backends.torch_backend import fused as fused_kernels  # noqa: E402
from purelm.backends.torch_backend.packed import Packed, pack  # noqa: E402
from purelm.formats.gguf import GGUFFile  # noqa: E402
from purelm.models import build_model  # noqa: E402
from purelm.quant.types import BLOCK_INFO, GGMLType  # noqa: E402

# (name, outputs, inputs, glu): TinyLlama-1.1B's layer, the shapes make_synthetic.py gives it
SHAPES_1B = [("qkv", 2560, 2048, None), ("o", 2048, 2048, None), ("gate_up", 2 * 5632, 2048, "silu"),
             ("down", 2048, 5632, None)]
ONE_ROW = ([("wide", bn, bk, w) for bn in (2, 4, 8, 16) for bk in (1024, 2048) for w in (2, 4, 8)]
           + [("pairs", 1, 256, 4), ("groups", 4, 512, 4)]
           + [("dot", bn, bk, 4, 16) for bn in (16, 32, 64) for bk in (256, 512)])
MANY_ROWS = ([("wide", bn, bk, w) for bn in (1, 4, 8, 16) for bk in (1024, 2048) for w in (4, 8)]
             + [("pairs", 16, 256, 4), ("rows", 1, 512, 4)]
             + [("dot", bn, bk, 4, 16) for bn in (16, 32, 64) for bk in (128, 256, 512)])
PROMPT_ROWS = [("dot", bn, bk, w, bm) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128) for w in (4, 8)]
FUSES = triton_kernels.FUSES  # kernels that can apply a gate|up pair's activation themselves


def configs(m: int, glu: str | None) -> list[tuple[tuple, bool]]:
    """(configuration, fused) to time for m activation rows: a gate|up pair both fused, where the
    kernel can for m rows, and in two steps."""
    cfgs = ONE_ROW if m == 1 else PROMPT_ROWS if m > triton_kernels.BM else MANY_ROWS
    return [(cfg, fused) for cfg in cfgs
            for fused in ((False, True) if glu and cfg[0] in FUSES and (m == 1 or cfg[0] == "dot") else (False,))]


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def graph_time(fns: list, reps: int = 10) -> float:
    """Seconds per call, from a CUDA graph of one call of each of fns (at least 20 in all), replayed
    `reps` times."""
    launches = max(20, len(fns))
    fns[0]()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / launches)
    return statistics.median(times)


def random_packed(qtype: GGMLType, n_out: int, n_in: int, dev: torch.device):
    block, bpb = BLOCK_INFO[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n_out, n_in // block * bpb), dtype=np.uint8)
    blocks = raw.reshape(-1, bpb)
    blocks[:, 0:2] = np.array([0.01], np.float16).view(np.uint8)  # finite scales
    return pack(qtype, [(n_out, raw)], n_in, dev)


def product(x: torch.Tensor, w, glu: str | None, cfg: tuple, fused: bool = False) -> torch.Tensor:
    """The product as the backend runs it: a gate|up pair fused or in two steps."""
    if glu and not fused:
        y = triton_kernels.product(x, w, torch.bfloat16, config=cfg)
        half = y.shape[1] // 2
        return fused_kernels.glu(y[:, :half], y[:, half:], silu=glu == "silu")
    return triton_kernels.product(x, w, torch.bfloat16, glu=glu, config=cfg)


def _compile(job: tuple) -> str | None:
    """Compile one configuration (in a worker process: Triton keeps it in its on-disk cache)."""
    qtype, n_out, n_in, glu, m, (cfg, fused) = job
    dev = torch.device("cuda")
    try:
        product(torch.zeros((m, n_in), dtype=torch.bfloat16, device=dev), random_packed(qtype, n_out, n_in, dev),
                glu, cfg, fused)
        torch.cuda.synchronize()
    except Exception as e:
        return f"{cfg}: {type(e).__name__}: {str(e)[:200]}"
    return None


def precompile(qtype: GGMLType, shapes: list, rows: list[int], jobs: int) -> None:
    """Every configuration compiled by `jobs` processes at once (compiling is most of a sweep's time)."""
    import multiprocessing

    work = [(qtype, 2 * 64 if glu else 64, n_in, glu, m, cfg) for _, _, n_in, glu in
            {(s[2], s[3]): s for s in shapes}.values() for m in rows if not (glu and 1 < m <= triton_kernels.BM)
            for cfg in configs(m, glu)]  # (n_out: a tile's worth; the kernels compile per K, not N)
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        errors = [e for e in pool.map(_compile, work, chunksize=1) if e]
    log(f"  compiled {len(work)} kernels in {time.perf_counter() - t0:.0f} s ({len(errors)} refused)")
    for e in errors[:5]:
        log("   ", e)


def sweep(qtype: GGMLType, shapes: list, rows: list[int], dev: torch.device, save=lambda out: None) -> list[dict]:
    """Each shape at each row count; `save(results so far)` after each (a run cut short keeps them)."""
    out: list[dict] = []
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 << 20
    for name, n_out, n_in, glu in shapes:
        w = random_packed(qtype, n_out, n_in, dev)
        copies = [w] + [Packed(w.type, w.shape, {k: p.clone() for k, p in w.planes.items()})
                        for _ in range(-(-4 * l2 // w.nbytes) - 1)]  # together 4x the L2 cache
        for m in rows:
            if glu and 1 < m <= triton_kernels.BM:
                continue  # (2-16 rows: the two-step path, the same kernel as the other shapes)
            x = torch.randn((m, n_in), dtype=torch.bfloat16, device=dev)
            results = []
            for cfg, fused in configs(m, glu):
                try:
                    t = graph_time([lambda c=c: product(x, c, glu, cfg, fused) for c in copies])
                except Exception as e:  # a configuration the compiler refuses: say so, go on
                    results.append({"config": cfg, "fused": fused, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                results.append({"config": cfg, "fused": fused, "us": round(t * 1e6, 2),
                                "gb_s": round(w.nbytes / t / 1e9, 1), "tflops": round(2 * m * n_out * n_in / t / 1e12, 1)})
            ok = [r for r in results if "us" in r]
            best = min(ok, key=lambda r: r["us"]) if ok else None
            tiled = None
            if m > triton_kernels.BM:  # the path before "dot": the matrix dequantized, then cuBLAS
                def two_steps(c):
                    y = x @ triton_kernels.dequantize(c, torch.bfloat16).T
                    return fused_kernels.glu(y[:, :n_out // 2], y[:, n_out // 2:], silu=glu == "silu") if glu else y
                t = graph_time([lambda c=c: two_steps(c) for c in copies])
                tiled = {"us": round(t * 1e6, 2), "tflops": round(2 * m * n_out * n_in / t / 1e12, 1)}
            want = triton_kernels.default_config(m, n_out // 2 if glu else n_out, n_in, glu is not None, dev)
            fused = want is not None and glu is not None
            want = want or triton_kernels.default_config(m, n_out // 2 if glu else n_out, n_in, False, dev)
            default = next((r for r in ok if tuple(r["config"]) == want and r["fused"] == fused), None)
            log(f"  {name:8s} {n_out:6d}x{n_in:<5d} rows {m:2d}: best {best and best['config']}"
                f"{' fused' if best and best['fused'] else ''} "
                f"{best and best['us']} us {best and best['gb_s']} GB/s {best and best['tflops']} TFLOP/s; "
                f"default {default and default['us']} us" + (f"; dequantize + mm {tiled['us']} us" if tiled else ""))
            out.append({"shape": name, "n_out": n_out, "n_in": n_in, "glu": glu, "rows": m, "bytes": w.nbytes,
                        "best": best, "default": default, "dequantize_mm": tiled, "all": results})
            save(out)
    return out


def step_profile(path: str, dev: torch.device, steps: int = 64) -> dict:
    """One decode step of the file: through model.forward, as a bare graph replay, and its kernels."""
    ops = TorchBackend(str(dev), "bf16")
    model = build_model(GGUFFile(path), ops)
    cache = model.new_cache(1024)  # (the 512-token prompt below too)
    ids = np.random.default_rng(0).integers(3, model.n_vocab, steps + 1)
    model.forward(ids[:1], cache)  # captures the step's graph
    # the host's part of a step: inside ops.run (inputs staged, the replay queued: no wait), inside
    # to_numpy (the wait for the GPU, then the logits' copy), and the rest (the model's Python)
    split = {"run": 0.0, "to_numpy": 0.0}
    real_run, real_to_numpy = ops.run, ops.to_numpy

    def timing(name, fn):
        def timed_call(*a):
            t = time.perf_counter()
            out = fn(*a)
            split[name] += time.perf_counter() - t
            return out
        return timed_call
    ops.run, ops.to_numpy = timing("run", real_run), timing("to_numpy", real_to_numpy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(1, steps):
        model.forward(ids[i:i + 1], cache)
    torch.cuda.synchronize()
    forward_s = (time.perf_counter() - t0) / (steps - 1)
    ops.run, ops.to_numpy = real_run, real_to_numpy
    entry = next(reversed(ops.graphs.graphs.values()))
    graph = entry["graph"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    replay_s = (time.perf_counter() - t0) / steps
    per_step, _ = profiled(graph.replay, 5)
    kernel_us = sum(us for _, us in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:15]
    host = {k: round(v / (steps - 1) * 1e6, 1) for k, v in split.items()}
    host["rest"] = round(forward_s * 1e6 - host["run"] - host["to_numpy"], 1)
    res = {"file": path, "forward_us": round(forward_s * 1e6, 1), "forward_split_us": host,
           "replay_us": round(replay_s * 1e6, 1),
           "kernel_us": round(kernel_us, 1), "kernels_per_step": round(sum(n for n, _ in per_step.values()), 1),
           "top_kernels": [{"name": k, "launches": n, "us": round(us, 1)} for k, (n, us) in top]}
    log(f"  step: forward {res['forward_us']} us ({host}), graph replay {res['replay_us']} us, kernels "
        f"{res['kernel_us']} us in {res['kernels_per_step']} launches")
    for t in res["top_kernels"]:
        log(f"    {t['us']:8.1f} us {t['launches']:6.1f}x {t['name']}")

    # a prompt of 512 tokens: its wall time replayed as a CUDA graph, then uncaptured (every kernel
    # launched from Python) its wall time against its kernels' device time, and the host's busiest
    # operators, to show whether the GPU or the host sets the pace of an uncaptured prompt
    prompt = np.random.default_rng(1).integers(3, model.n_vocab, 512)

    def prefill() -> None:
        cache.truncate(0)
        model.forward(prompt, cache)
        torch.cuda.synchronize()

    def walls() -> list[float]:
        prefill()  # (with graphs: the first of its shape runs uncaptured, the second is captured)
        prefill()
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            prefill()
            out.append(time.perf_counter() - t0)
        return out

    graph_walls = walls()
    runner, ops.graphs = ops.graphs, None
    eager_walls = walls()
    # the host's part: time until the logits are asked for (every kernel queued by then, unless the
    # pass waited on the GPU on its way: each such wait is counted, with the line that made it)
    real_to_numpy, queued = ops.to_numpy, []

    def to_numpy(x):
        queued.append(time.perf_counter())
        return real_to_numpy(x)
    ops.to_numpy = to_numpy
    syncs: dict[str, int] = {}
    torch.cuda.set_sync_debug_mode("warn")

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "purelm" in f.filename and "benchmarks" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        syncs[where] = syncs.get(where, 0) + 1
    try:
        with warnings.catch_warnings():  # (puts showwarning back)
            warnings.simplefilter("always")
            warnings.showwarning = show
            t0 = time.perf_counter()
            prefill()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        ops.to_numpy = real_to_numpy
    enqueue_ms = (queued[0] - t0) * 1e3 if queued else None
    per_pass, host = profiled(prefill, 2, cpu=True)
    ops.graphs = runner
    top = sorted(per_pass.items(), key=lambda kv: -kv[1][1])[:10]
    res["prefill_512"] = {
        "graph_wall_ms": round(statistics.median(graph_walls) * 1e3, 2),
        "wall_ms": round(statistics.median(eager_walls) * 1e3, 2),
        "kernel_ms": round(sum(us for _, us in per_pass.values()) / 1e3, 2),
        "launches": round(sum(n for n, _ in per_pass.values()), 1),
        "queued_ms": enqueue_ms and round(enqueue_ms, 2), "waits_on_gpu": syncs,
        "top_kernels": [{"name": k, "launches": n, "us": round(us, 1)} for k, (n, us) in top],
        "top_host_ops": host[:12]}
    pf = res["prefill_512"]
    log(f"  prefill of 512: replayed as a graph {pf['graph_wall_ms']} ms; uncaptured: wall {pf['wall_ms']} ms, "
        f"kernels {pf['kernel_ms']} ms in {pf['launches']} launches, "
        f"queued by the host in {pf['queued_ms']} ms; waits on the GPU: {syncs}")
    for t in pf["top_kernels"][:6]:
        log(f"    {t['us']:8.1f} us {t['launches']:6.1f}x {t['name']}")
    for t in pf["top_host_ops"][:8]:
        log(f"    host {t['self_ms']:7.2f} ms {t['calls']:6.1f}x {t['name']}")
    return res


def launch_cost(dev: torch.device, calls: int = 300) -> dict:
    """Host microseconds per call (nothing waits for the GPU), for one row of a 2048x2048 Q4_0: a
    product through the backend's wrapper, the same Triton kernel launched through Triton, the kernel
    Triton compiled called directly (its launcher, as Triton calls it: tensors, whose every pointer the
    launcher checks with the driver; and with the pointers as integers, which it takes as they are),
    and a torch add. Where the direct call does not work with this Triton, its error instead."""
    kernel = triton_kernels._wide_kernel
    w = random_packed(GGMLType.Q4_0, 2048, 2048, dev)
    x = torch.randn((1, 2048), dtype=torch.bfloat16, device=dev)
    y = torch.empty((1, 2048), dtype=torch.bfloat16, device=dev)
    ptrs, consts = triton_kernels._args(w)
    args = [x, y, *ptrs, triton_kernels.levels(dev), 1, 2048, 2048, 2048]
    kwargs = dict(ROWS=1, BN=4, BK=2048, GLU=False, SILU=False, **consts)
    fns = {"product": lambda: triton_kernels.product(x, w, torch.bfloat16),
           "through_triton": lambda: kernel[(512, 1)](*args, num_warps=4, **kwargs),
           "torch_add": lambda: torch.add(x, x)}
    out: dict = {}
    try:
        compiled = kernel[(512, 1)](*args, num_warps=4, **kwargs)
        rest = [kwargs[n] for n in kernel.arg_names[len(args):]]
        ints = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]

        def direct(values: list) -> None:
            stream = torch.cuda.current_stream().cuda_stream
            compiled.run(512, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *values, *rest)
        direct(args)
        fns["direct_tensors"] = lambda: direct(args)
        fns["direct_int_pointers"] = lambda: direct(ints)
    except Exception as e:  # another Triton's launcher
        out["direct_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out[name] = round((time.perf_counter() - t0) / calls * 1e6, 2)
        torch.cuda.synchronize()
    if "direct_int_pointers" in out:  # the same result as through Triton
        y0 = y.clone()
        y.zero_()
        fns["direct_int_pointers"]()
        out["direct_same_result"] = bool(torch.equal(y, y0))
    log(f"  host time per call: {out} us")
    return out


def profiled(fn, reps: int, cpu: bool = False) -> tuple[dict, list]:
    """Per call of fn: {kernel: (launches, device us)}, and (with `cpu`) the host operators by their own
    time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            kernels.setdefault(ev.name[:60], []).append(ev.device_time_total if hasattr(ev, "device_time_total")
                                                        else ev.cuda_time_total)
    host = []
    if cpu:
        for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:20]:
            host.append({"name": a.key[:60], "calls": a.count / reps, "self_ms": round(a.self_cpu_time_total / reps / 1e3, 2)})
    return {k: (len(v) / reps, sum(v) / reps) for k, v in kernels.items()}, host


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--rows", default="1,2,4,16,512", help="activation rows (more than 16: a prompt's)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--jobs", type=int, default=8, help="processes compiling the sweep's kernels")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, help="write the best configuration per shape here (JSON)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA device: this benchmark is for a GPU")
        return 2
    dev = torch.device("cuda")
    report: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_sweep:
        log("sweep (Q4_0, the 1.1B's shapes)")
        if args.jobs > 1:
            precompile(GGMLType.Q4_0, SHAPES_1B, [int(r) for r in args.rows.split(",")], args.jobs)
        def save(results: list[dict]) -> None:
            report["sweep"] = results
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1))
            if args.table:  # what default_config reads (PURELM_TRITON_CONFIGS, or configs/<GPU>.json)
                entries = [{"rows": triton_kernels.bucket(s["rows"]), "glu": s["glu"] is not None,
                            "n": s["n_out"] // 2 if s["glu"] else s["n_out"], "k": s["n_in"], "type": "Q4_0",
                            "config": list(s["best"]["config"]), "gb_s": s["best"]["gb_s"],
                            "unfused": bool(s["glu"]) and not s["best"]["fused"]}
                           for s in results if s["best"]]
                Path(args.table).write_text(json.dumps({"gpu": report["gpu"], "command": report["command"],
                                                        "date": report["date"], "entries": entries}, indent=1))

        sweep(GGMLType.Q4_0, SHAPES_1B, [int(r) for r in args.rows.split(",")], dev, save)
    try:
        report["launch_us"] = launch_cost(dev)
    except Exception as e:
        report["launch_us"] = {"error": f"{type(e).__name__}: {e}"}
    report["steps"] = []
    for path in args.models:
        log(path)
        try:
            report["steps"].append(step_profile(path, dev))
        except Exception as e:
            traceback.print_exc()
            report["steps"].append({"file": path, "error": f"{type(e).__name__}: {e}"})
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
