"""Prompt-lookup speculative decoding against plain decoding, purelm and llama.cpp, on the chat prompts
of benchmarks/prompts/lookup/ (code edits, extraction, summaries, questions over a document: answers
that copy spans of their prompt).

    python benchmarks/lookup_bench.py                       # SmolLM2, 2 threads, 3 repetitions
    python benchmarks/lookup_bench.py --threads 1,2 --reps 5 --json out.json
    python benchmarks/lookup_bench.py --llama-bin DIR       # DIR holds llama-lookup (see benchmarks/README.md)

For each thread count, repetition and prompt, the variants run one after the other in an order that
rotates (run by run): purelm plain, purelm --lookup N, and with llama.cpp's `llama-lookup` (its own
prompt-lookup example, a fresh process per run) plain (--spec-draft-n-max 0) and lookup. Greedy
decoding up to --max-tokens or the end of the turn. purelm's figures come through the user's path
(`LLM.complete`: sampling, detokenizing, stop checks included); decode tokens/s = generated tokens /
decode time, the prompt excluded (llama-lookup's "decoded ... t/s" likewise). purelm's lookup output
is checked to equal its plain output token for token. Reported: per-prompt medians, and geometric
means of the speed-ups over the prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts" / "lookup"
LLAMA_BIN = Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"


def load_prompts(folder: Path) -> list[tuple[str, list[dict]]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        spec = json.loads(path.read_text())
        msgs = spec.get("messages")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        for m in msgs)):
            raise SystemExit(f"{path}: needs a non-empty list of messages with text content")
        out.append((path.stem, msgs))
    if not out:
        raise SystemExit(f"no prompts (*.json) in {folder}")
    return out


def run_purelm(llm, ids: list[int], max_tokens: int, lookup: int | None) -> dict:
    llm.reset()  # the prompt is evaluated afresh each time (its time is not counted anyway)
    c = llm.complete(ids, max_tokens=max_tokens, temperature=0, lookup=lookup)
    t = c.timings
    res = {"tokens": c.tokens, "n": int(t["generated_tokens"]), "decode_s": t["generate_s"],
           "tok_s": t["generated_tokens"] / t["generate_s"]}
    if lookup:
        res.update(steps=int(t["decode_steps"]), drafted=int(t["draft_tokens"]), accepted=int(t["accepted_tokens"]))
    return res


_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
_COUNT = re.compile(r"(n_drafted|n_accept)\s+=\s+(\d+)")


def run_llama(binary: Path, model: Path, prompt_file: Path, max_tokens: int, threads: int, n_draft: int,
              n_ctx: int) -> dict:
    cmd = [str(binary), "-m", str(model), "-f", str(prompt_file), "-n", str(max_tokens), "-t", str(threads),
           "--temp", "0", "--spec-draft-n-max", str(n_draft), "-c", str(n_ctx)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = r.stdout + r.stderr
    m = _DECODED.search(text)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {text[-800:]}")
    counts = dict((k, int(v)) for k, v in _COUNT.findall(text))
    n, secs = int(m.group(1)), float(m.group(2))
    return {"n": n, "decode_s": secs, "tok_s": n / secs, "drafted": counts.get("n_drafted", 0),
            "accepted": counts.get("n_accept", 0)}


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a .gguf path or a known name (default smollm2)")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every prompt and variant (default 3)")
    ap.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    ap.add_argument("--lookup", type=int, default=10, help="draft tokens per step at most (default 10)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--prompts", type=Path, default=PROMPTS, help="folder of *.json chat requests")
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="folder with llama-lookup ('' to skip)")
    ap.add_argument("--only", default=None, help="comma-separated prompt names (stems) to run")
    ap.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.max_tokens < 1 or a.lookup < 1:
        ap.error("--reps, --max-tokens and --lookup must be at least 1")
    threads = [int(t) for t in a.threads.split(",")]

    import purelm
    from purelm.hub import resolve

    model = Path(resolve(a.model))
    prompts = load_prompts(a.prompts)
    if a.only:
        keep = set(a.only.split(","))
        prompts = [p for p in prompts if p[0] in keep]
    lookup_bin = a.llama_bin / "llama-lookup" if str(a.llama_bin) else None
    if lookup_bin is not None and not lookup_bin.exists():
        print(f"[llama-lookup not found in {a.llama_bin}: llama.cpp skipped]", file=sys.stderr)
        lookup_bin = None

    report = {"model": str(model), "max_tokens": a.max_tokens, "lookup": a.lookup, "reps": a.reps,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "summary": {}}
    tmp = Path(tempfile.mkdtemp(prefix="lookup_bench_"))
    variants = ["purelm", "purelm+lookup"] + (["llama.cpp", "llama.cpp+lookup"] if lookup_bin else [])
    for n_threads in threads:
        llm = purelm.load(model, n_ctx=a.n_ctx, threads=n_threads)
        ids = {name: llm.chat_prompt(msgs) for name, msgs in prompts}
        files = {}
        for name, msgs in prompts:
            files[name] = tmp / f"{name}.txt"
            files[name].write_text(llm.chat_template.render(msgs))
        llm.complete(ids[prompts[0][0]], max_tokens=8, temperature=0, lookup=a.lookup)  # compile / warm up
        results: dict[tuple[str, str], list[dict]] = {}
        for rep in range(a.reps):
            for i, (name, _) in enumerate(prompts):
                shift = (rep + i) % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    if v.startswith("purelm"):
                        r = run_purelm(llm, ids[name], a.max_tokens, a.lookup if v.endswith("lookup") else None)
                    else:
                        r = run_llama(lookup_bin, model, files[name], a.max_tokens, n_threads,
                                      a.lookup if v.endswith("lookup") else 0, a.n_ctx)
                    results.setdefault((name, v), []).append(r)
                    report["runs"].append({"threads": n_threads, "rep": rep, "prompt": name, "variant": v,
                                           **{k: x for k, x in r.items() if k != "tokens"}})
                plain, spec = results[(name, "purelm")][-1], results[(name, "purelm+lookup")][-1]
                if spec["tokens"] != plain["tokens"]:
                    raise SystemExit(f"{name}: purelm's lookup output differs from its plain output")
                print(f"[{n_threads}t rep {rep + 1}/{a.reps} {name}: "
                      + ", ".join(f"{v} {results[(name, v)][-1]['tok_s']:.1f}" for v in variants) + " tok/s]",
                      file=sys.stderr, flush=True)
        summary = summarize(prompts, variants, results)
        report["summary"][str(n_threads)] = summary
        print_table(n_threads, prompts, variants, summary)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


def summarize(prompts, variants, results) -> dict:
    per_prompt = {}
    for name, _ in prompts:
        row = {}
        for v in variants:
            rs = results[(name, v)]
            speeds = [r["tok_s"] for r in rs]
            row[v] = {"tok_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds), "n": rs[0]["n"]}
            if "drafted" in rs[0]:
                steps = rs[0].get("steps")
                row[v].update(drafted=rs[0]["drafted"], accepted=rs[0]["accepted"])
                if steps:
                    row[v].update(steps=steps, tokens_per_step=rs[0]["n"] / steps,
                                  accepted_per_step=rs[0]["accepted"] / steps)
        per_prompt[name] = row
    med = {v: [per_prompt[n][v]["tok_s"] for n, _ in prompts] for v in variants}
    out = {"per_prompt": per_prompt,
           "geomean_tok_s": {v: geomean(med[v]) for v in variants},
           "speedup_lookup_vs_plain": geomean([s / p for s, p in zip(med["purelm+lookup"], med["purelm"])]),
           "tokens_per_step": geomean([per_prompt[n]["purelm+lookup"]["tokens_per_step"] for n, _ in prompts]),
           "accepted_per_step": statistics.mean(per_prompt[n]["purelm+lookup"]["accepted_per_step"]
                                                for n, _ in prompts)}
    if "llama.cpp" in med:
        out["speedup_lookup_vs_llama_plain"] = geomean([s / p for s, p in zip(med["purelm+lookup"], med["llama.cpp"])])
        out["speedup_lookup_vs_llama_lookup"] = geomean(
            [s / p for s, p in zip(med["purelm+lookup"], med["llama.cpp+lookup"])])
        out["speedup_plain_vs_llama_plain"] = geomean([s / p for s, p in zip(med["purelm"], med["llama.cpp"])])
    return out


def print_table(n_threads, prompts, variants, s) -> None:
    print(f"\n{n_threads} thread(s), decode tok/s (median of reps), tokens per step with lookup")
    print(f"{'prompt':28s} {'tokens':>6s} " + " ".join(f"{v:>16s}" for v in variants) + f" {'tok/step':>8s}")
    for name, _ in prompts:
        row = s["per_prompt"][name]
        print(f"{name:28s} {row['purelm']['n']:6d} " + " ".join(f"{row[v]['tok_s']:16.1f}" for v in variants)
              + f" {row['purelm+lookup']['tokens_per_step']:8.2f}")
    print(f"{'geometric mean':28s} {'':6s} " + " ".join(f"{s['geomean_tok_s'][v]:16.1f}" for v in variants)
          + f" {s['tokens_per_step']:8.2f}")
    print(f"lookup / plain (purelm): {s['speedup_lookup_vs_plain']:.2f}x; accepted drafts per step "
          f"{s['accepted_per_step']:.2f}")
    if "speedup_lookup_vs_llama_plain" in s:
        print(f"purelm lookup / llama.cpp plain: {s['speedup_lookup_vs_llama_plain']:.2f}x; / llama.cpp lookup: "
              f"{s['speedup_lookup_vs_llama_lookup']:.2f}x; purelm plain / llama.cpp plain: "
              f"{s['speedup_plain_vs_llama_plain']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
