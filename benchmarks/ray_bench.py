"""purelm on Ray against a single `purelm serve`, on one machine.

    python benchmarks/ray_bench.py smollm2 --out benchmarks/results/ray_bench.json
    python benchmarks/ray_bench.py model.gguf --requests 64 --clients 8 --max-tokens 32 --prompts 1000

Online: `--clients` concurrent clients (asyncio + httpx, non-streamed POST /v1/completions, temperature 0,
`ignore_eos` so every reply is `--max-tokens` long, a prompt of its own each) send `--requests` requests in
all, to
  1. `purelm serve` (a subprocess, `--threads` threads, every core by default; the engine in its main thread),
  2. the Ray Serve app with 1 replica (as many CPUs and threads),
  3. the Ray Serve app with 2 replicas (half the cores each).
Each is warmed up with one round of other prompts first. Reported: requests/s, generated tokens/s, and
latency p50/p95 (request sent to the whole reply).
Offline: `--prompts` prompts (`--data-max-tokens` tokens each, greedy) through the Ray Data processor
(`process`, an actor pool of 2 actors, half the cores each, batches of 64), against the same prompts sent
to the single `purelm serve` by 16 concurrent clients; prompts per second of each.

JSON on stdout (--out keeps a copy), a table on stderr. Serve runs with a local Ray cluster started here
(its processes share the machine with the model: on 2 cores Ray's own controller, proxy and raylet take
a share of the CPU the model would otherwise have)."""
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

TOPICS = ["a lighthouse", "a robot", "tea", "a village", "chess", "the sea", "a bakery", "a caravan", "bridges",
          "a clock", "a festival", "a river", "a library", "Mars", "a violin", "a storm"]


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}).\n\nStory:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> float:
    return os.getloadavg()[0]


async def drive(base: str, prompts: list[str], clients: int, max_tokens: int, ignore_eos: bool) -> dict:
    """`clients` workers take the prompts in turn; returns throughput and latency figures."""
    import httpx

    todo = list(enumerate(prompts))
    lat: list[float] = []
    tokens = 0
    failed = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failed
        while todo:
            _, p = todo.pop(0)
            t0 = time.perf_counter()
            r = await client.post(base + "/v1/completions", json={
                "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos})
            if r.status_code != 200:
                failed += 1
                continue
            lat.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(prompts), "failed": failed, "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3), "generated_tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}


def online(base: str, args: argparse.Namespace) -> dict:
    asyncio.run(drive(base, [prompt(10_000 + i) for i in range(args.clients)], args.clients, 4, True))  # warm up
    load0 = load_avg()
    r = asyncio.run(drive(base, [prompt(i) for i in range(args.requests)], args.clients, args.max_tokens, True))
    r["load_avg_before"] = round(load0, 2)
    return r


def wait_http(base: str, timeout: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not come up in {timeout} s")


def single_server(path: str, args: argparse.Namespace, cores: int) -> tuple[dict, dict]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "purelm.cli", "serve", path, "-c", str(args.ctx), "-np", "8",
                             "-t", str(cores), "--port", str(port), "--queue", "1024", "-q"])
    try:
        wait_http(base)
        on = online(base, args)
        t0 = time.perf_counter()
        data = asyncio.run(drive(base, [prompt(i) for i in range(args.prompts)], 16, args.data_max_tokens, False))
        data["prompts_per_s"] = round(args.prompts / (time.perf_counter() - t0), 2)
        return on, data
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf file or a known model name")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--data-max-tokens", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the single server and of the 1-replica app (default: every core); 2 replicas "
                         "and 2 Data actors get half as many each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray
    from ray import serve

    from purelm.hub import resolve
    from purelm.integrations.ray import build_app, process

    path = str(resolve(args.model))
    cores = args.threads or os.cpu_count() or 1
    out: dict = {"model": os.path.basename(path), "cores": cores, "machine": platform.machine(),
                 "python": platform.python_version(), "ray": ray.__version__, "args": vars(args), "results": {}}
    res = out["results"]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    log("single purelm serve ...")
    res["single_purelm_serve"], res["data_via_single_purelm_serve"] = single_server(path, args, cores)

    ray.init(num_cpus=2 * cores, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for n in (1, 2):
            log(f"Ray Serve, {n} replica(s) ...")
            cpus = max(1, cores // n)
            serve.run(build_app({"model": path, "n_ctx": args.ctx, "replicas": n, "num_cpus": cpus, "threads": cpus,
                                 "name": "bench"}), name="bench", route_prefix="/")
            wait_http(base)
            res[f"ray_serve_{n}_replica{'s' if n > 1 else ''}"] = online(base, args)
            serve.delete("bench")
        serve.shutdown()
        log("Ray Data processor ...")
        import ray.data

        ds = ray.data.from_items([{"id": i, "prompt": prompt(i)} for i in range(args.prompts)])
        t0 = time.perf_counter()
        rows = process(ds, model=path, n_ctx=args.ctx, concurrency=2, batch_size=64, num_cpus=max(1, cores // 2),
                       max_tokens=args.data_max_tokens).select_columns(["id", "completion_tokens"]).take_all()
        wall = time.perf_counter() - t0
        assert sorted(r["id"] for r in rows) == list(range(args.prompts)), "a prompt was lost or doubled"
        generated = sum(r["completion_tokens"] for r in rows)
        res["ray_data_processor"] = {"prompts": args.prompts, "wall_s": round(wall, 2),
                                     "prompts_per_s": round(args.prompts / wall, 2),
                                     "generated_tokens_per_s": round(generated / wall, 1)}
    finally:
        ray.shutdown()
    out["load_avg_end"] = round(load_avg(), 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for name, r in res.items():
        log(f"{name:32} " + "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("requests",)))


if __name__ == "__main__":
    main()
