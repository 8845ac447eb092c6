"""Concurrent streaming clients against `purelm serve` and llama.cpp's `llama-server`, on the same file
and threads, servers alternating.

    python benchmarks/serve_bench.py smollm2 --llama-server PATH/llama-server --threads 2
    python benchmarks/serve_bench.py model.gguf --clients 1,8 --max-tokens 64 --reps 2 --out serve.json
    python benchmarks/serve_bench.py smollm2 --prompts lookup --lookup 10 --clients 1,4,8 --max-tokens 256

For each number of clients N (`--clients`, default 1,4,8,16) each server is started with N slots
(`purelm serve --parallel N`, `llama-server -np N -cb`, each slot `--ctx` tokens), warmed up with one
request and a round of N short ones (other prompts), and then N clients at once each stream one
completion (POST /v1/completions, stream: true) of a prompt of its own (~40 tokens), `--max-tokens`
tokens long (`ignore_eos`, so every reply has that length; a new connection per request; sampling: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, seed per client). Reported per
server and N (medians over `--reps`): aggregate output tokens/s (all clients' tokens over the time from
the first request sent to the last token received), time to first token p50 and p95 (request sent to
the first event with text), the speed-up over one client, and purelm's ratio to llama-server; also
`other_load` per rep (cores kept busy by other processes, or stolen by the hypervisor, during the run:
/proc/stat minus the server's and this process's CPU time) and `*_quiet` figures from the reps where it
was under `--quiet-load` (0.25). The
servers run as subprocesses, one at a time, with OMP/OPENBLAS/NUMBA thread variables set to the thread
count; the clients run in this process (asyncio + httpx), on the same machine. JSON on stdout (--out
keeps a copy), a table on stderr. The KV cache is each server's default (purelm float32, llama-server
f16) unless `--cache-type` gives both the same `-ctk`/`-ctv`.

`--lookup N` adds `purelm serve --lookup N` (speculative decoding by prompt lookup) as a third server,
purelm+lookup; `--prompts lookup` sends the greedy chat requests of benchmarks/prompts/lookup (answers
that copy spans of their prompt, each to its end: tokens counted from the usage each stream reports)
instead of the sampled stories.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["a lighthouse keeper", "a lost robot", "the history of tea", "a mountain village", "a chess match",
          "the deep sea", "a bakery at dawn", "a desert caravan", "a city of bridges", "an old clock",
          "a winter festival", "a river journey", "a library at night", "a garden on Mars", "a violin maker",
          "a storm at sea", "a fox and a crow", "a train across the steppe", "the first snow", "a market day"]


LOOKUP_PROMPTS: list = []  # (name, messages) of benchmarks/prompts/lookup, with --prompts lookup


def prompt(i: int) -> str:
    return (f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (number {i}). Describe the places, "
            f"the people and what happens to them, from the beginning to the end.\n\nStory:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, args: argparse.Namespace, path: str, n: int, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "PURELM_NUM_THREADS"):
        env[k] = str(args.threads)
    if kind.startswith("purelm"):
        cmd = [sys.executable, "-m", "purelm.cli", "serve", path, "--parallel", str(n), "-t", str(args.threads),
               "-c", str(args.ctx), "--port", str(port), "--queue", str(4 * n), "-q"]
        if kind == "purelm+lookup":
            cmd += ["--lookup", str(args.lookup)]
    else:
        cmd = [args.llama_server, "-m", path, "-np", str(n), "-cb", "-t", str(args.threads), "-tb",
               str(args.threads), "-c", str(args.ctx * n), "--port", str(port), "--host", "127.0.0.1",
               "--no-webui", "--log-disable"]
    if args.cache_type:  # the same flags in both
        cmd += ["-ctk", args.cache_type, "-ctv", args.cache_type]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient() as client:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                r = await client.get(base + "/health", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not start in time")


def body(i: int, args: argparse.Namespace, max_tokens: int) -> dict:
    if args.prompts == "lookup":  # a chat request of benchmarks/prompts/lookup, greedy, to its end
        msgs = LOOKUP_PROMPTS[i % len(LOOKUP_PROMPTS)][1]
        return {"messages": msgs, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
    return {"prompt": prompt(i), "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 1000 + i}


async def one_client(client, base: str, b: dict) -> dict:
    t0 = time.perf_counter()
    first, events, reason, usage = None, 0, None, None
    route = "/v1/chat/completions" if "messages" in b else "/v1/completions"
    async with client.stream("POST", base + route, json=b, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"error event: {ev['error']}")
            usage = ev.get("usage") or usage
            for c in ev.get("choices") or []:
                if c.get("text") or (c.get("delta") or {}).get("content"):
                    events += 1
                    if first is None:
                        first = time.perf_counter()
                reason = c.get("finish_reason") or reason
    return dict(t0=t0, first=first, end=time.perf_counter(), events=events, finish_reason=reason,
                tokens=usage["completion_tokens"] if usage else None)


def busy_ticks() -> int:
    """CPU time the whole machine spent busy (steal included), in clock ticks; 0 if unknown."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return 0


def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return 0


async def run_level(base: str, n: int, args: argparse.Namespace, server_pid: int) -> dict:
    import httpx

    # a new connection per request: llama-server closes kept-alive ones at times, as httpx reuses them
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        for attempt in range(10):  # warm-up: kernels, first-request costs
            try:
                await one_client(client, base, body(999, args, 8))
                break
            except httpx.TransportError:  # llama-server sometimes drops its first connections after /health
                if attempt == 9:
                    raise
                await asyncio.sleep(0.5)
        # and a round of n clients with other prompts (a first batch of n prompts costs more, once)
        await asyncio.gather(*[one_client(client, base, body(100 + i, args, 8)) for i in range(n)])
        hz = os.sysconf("SC_CLK_TCK")
        t_wall, busy0, srv0, me0 = time.perf_counter(), busy_ticks(), proc_ticks(server_pid), proc_ticks(os.getpid())
        res = await asyncio.gather(*[one_client(client, base, body(i, args, args.max_tokens)) for i in range(n)])
        wall_ticks = (time.perf_counter() - t_wall) * hz
        other = (busy_ticks() - busy0 - (proc_ticks(server_pid) - srv0) - (proc_ticks(os.getpid()) - me0)) / wall_ticks
    t0 = min(r["t0"] for r in res)
    wall = max(r["end"] for r in res) - t0
    ttft = sorted(r["first"] - r["t0"] for r in res)
    # ignore_eos replies are max_tokens long; the lookup prompts' end where the answer does (usage says)
    tokens = n * args.max_tokens if args.prompts == "story" else sum(r["tokens"] or r["events"] for r in res)
    return dict(clients=n, wall_s=wall, tokens=tokens, tok_s=tokens / wall,
                ttft_p50_s=statistics.median(ttft), ttft_p95_s=ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
                per_client_tok_s=statistics.median(args.max_tokens / (r["end"] - r["t0"]) for r in res),
                events=sum(r["events"] for r in res), other_load=round(max(0.0, other), 3),
                finish_reasons=sorted({str(r["finish_reason"]) for r in res}))


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), platform=platform.platform())
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        import purelm

        info["purelm"] = purelm.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a .gguf path or a known name (smollm2)")
    ap.add_argument("--llama-server", default=None, help="the llama-server binary (omit: purelm alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8,16", help="numbers of concurrent clients")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens each client receives")
    ap.add_argument("--ctx", type=int, default=512, help="context tokens per slot")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quiet-load", type=float, default=0.25,
                    help="a rep is quiet when other processes kept fewer cores than this busy (default 0.25)")
    ap.add_argument("--lookup", type=int, default=0, metavar="N",
                    help="also run `purelm serve --lookup N` (prompt-lookup speculative decoding) as purelm+lookup")
    ap.add_argument("--prompts", choices=("story", "lookup"), default="story",
                    help="story: sampled stories of --max-tokens tokens (default); lookup: the greedy chat requests "
                         "of benchmarks/prompts/lookup (edits, extraction, summaries), each to its end")
    ap.add_argument("--cache-type", choices=("f32", "f16", "q8_0"), default=None,
                    help="KV cache type of every server (default: each its own, purelm f32 and llama-server f16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prompts == "lookup":
        sys.path.insert(0, str(Path(__file__).parent))
        from lookup_bench import PROMPTS, load_prompts

        LOOKUP_PROMPTS[:] = load_prompts(PROMPTS)
    levels = [int(x) for x in args.clients.split(",")]
    from purelm.hub import resolve

    path = str(resolve(args.model))
    servers = ["purelm"] + (["purelm+lookup"] if args.lookup else [])
    servers += ["llama-server"] if args.llama_server else []
    runs: dict[tuple[str, int], list[dict]] = {}
    loadavg_start = os.getloadavg()
    t_start = time.strftime("%Y-%m-%d %H:%M:%S")
    for rep in range(args.reps):
        for i, n in enumerate(levels):
            order = servers if (rep + i) % 2 == 0 else servers[::-1]
            for kind in order:
                port = free_port()
                print(f"rep {rep + 1}/{args.reps}: {kind}, {n} client(s)", file=sys.stderr, flush=True)
                proc = start_server(kind, args, path, n, port)
                try:
                    base = f"http://127.0.0.1:{port}"
                    asyncio.run(wait_ready(base, proc))
                    runs.setdefault((kind, n), []).append(asyncio.run(run_level(base, n, args, proc.pid)))
                except Exception:
                    time.sleep(0.5)
                    print(f"{kind} failed (exit status {proc.poll()}); its stderr ends with:\n"
                          f"{proc.stderr.read()[-3000:] if proc.poll() is not None else '(still running)'}",
                          file=sys.stderr)
                    raise
                finally:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    results = []
    for (kind, n), reps in runs.items():
        quiet = [r for r in reps if r["other_load"] < args.quiet_load]
        results.append(dict(server=kind, clients=n, tok_s=statistics.median(r["tok_s"] for r in reps),
                            tok_s_quiet=statistics.median(r["tok_s"] for r in quiet) if quiet else None,
                            ttft_p50_s_quiet=statistics.median(r["ttft_p50_s"] for r in quiet) if quiet else None,
                            n_quiet=len(quiet), other_load_reps=[r["other_load"] for r in reps],
                            ttft_p50_s=statistics.median(r["ttft_p50_s"] for r in reps),
                            ttft_p95_s=statistics.median(r["ttft_p95_s"] for r in reps),
                            per_client_tok_s=statistics.median(r["per_client_tok_s"] for r in reps),
                            tok_s_reps=[round(r["tok_s"], 2) for r in reps], reps=reps))
    by = {(r["server"], r["clients"]): r for r in results}
    for r in results:
        one = by.get((r["server"], 1))
        r["vs_one_client"] = r["tok_s"] / one["tok_s"] if one else None
        r["vs_one_client_quiet"] = r["tok_s_quiet"] / one["tok_s_quiet"] if one and one["tok_s_quiet"] and \
            r["tok_s_quiet"] else None
        peer = by.get(("llama-server", r["clients"]))
        plain = by.get(("purelm", r["clients"]))
        if r["server"] == "purelm+lookup" and plain:
            r["vs_purelm"] = r["tok_s"] / plain["tok_s"]
        if r["server"].startswith("purelm") and peer:
            r["vs_llama_server"] = r["tok_s"] / peer["tok_s"]
            r["vs_llama_server_quiet"] = r["tok_s_quiet"] / peer["tok_s_quiet"] if r["tok_s_quiet"] and \
                peer["tok_s_quiet"] else None
    report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), model=path,
                  file_mb=os.path.getsize(path) / 2**20, time_start=t_start, time_end=time.strftime("%Y-%m-%d %H:%M:%S"),
                  machine=dict(machine(), loadavg_start=loadavg_start, loadavg_end=os.getloadavg()),
                  settings=dict(threads=args.threads, clients=levels, max_tokens=args.max_tokens, ctx_per_slot=args.ctx,
                                reps=args.reps, llama_server=args.llama_server, prompts=args.prompts,
                                lookup=args.lookup),
                  results=sorted(results, key=lambda r: (servers.index(r["server"]), r["clients"])))
    print(f"{'server':<13} {'clients':>7} {'tok/s':>8} {'vs 1':>6} {'ttft p50':>9} {'ttft p95':>9} "
          f"{'vs llama-server':>15} {'quiet tok/s':>11}  other load per rep", file=sys.stderr)
    for r in report["results"]:
        vs = r.get("vs_llama_server")
        q = r["tok_s_quiet"]
        print(f"{r['server']:<13} {r['clients']:>7} {r['tok_s']:>8.1f} {r['vs_one_client'] or 0:>5.2f}x "
              f"{r['ttft_p50_s']:>8.3f}s {r['ttft_p95_s']:>8.3f}s {f'{vs:.2f}x' if vs else '':>15} "
              f"{f'{q:.1f}' if q else '-':>11}  {r['other_load_reps']}", file=sys.stderr)
    for r in report["results"]:
        if "vs_purelm" in r:
            print(f"purelm+lookup / purelm at {r['clients']} client(s): {r['vs_purelm']:.2f}x", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
