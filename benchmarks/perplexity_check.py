"""`purelm perplexity` against llama.cpp's `llama-perplexity`: same file, text, -c and threads.

Each tool runs as its own process, the two taking turns (--reps times) so that noise from other jobs on
the machine hits both; the figures, wall times (whole command: load, tokenize, evaluate) and evaluation
times (eval_seconds: purelm's own count; llama.cpp's log stamps) are printed and saved as JSON.

    python benchmarks/perplexity_check.py                      # SmolLM2 Q4_1 on GPL-3, -c 512, 2 threads
    python benchmarks/perplexity_check.py --model /tmp/tinyllama-synth-q4_0.gguf --chunks 4
    # KL divergence: both tools save the base model's log-probabilities, then score --model against them
    # (purelm against its own file and against llama.cpp's: the format is the same). SmolLM2 at f16 and
    # its Q4_K_M:
    #   purelm quantize --allow-requantize ~/.cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    #       /tmp/smollm2-f16.gguf f16
    #   llama-quantize /tmp/smollm2-f16.gguf /tmp/smollm2-q4_k_m.gguf Q4_K_M
    python benchmarks/perplexity_check.py --model /tmp/smollm2-q4_k_m.gguf --kl-base-model /tmp/smollm2-f16.gguf

Options: --llama-bin DIR (llama-perplexity's folder), --text FILE, -c, --threads, --chunks, --reps,
--json OUT. Prints one JSON document on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_BIN = Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
SMOLLM2 = Path.home() / ".cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
STAT = re.compile(r"^(.+?):\s+(-?[0-9.]+)\s*(?:±\s*(-?[0-9.]+))?\s*%?\s*$")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def run(cmd: list[str], want: str = "Final estimate") -> tuple[str, float]:
    """Output and wall time of `cmd`. llama.cpp's log thread sometimes loses its last lines when the
    process exits: a run whose output lacks `want` is run again (up to 3 times)."""
    log("$", " ".join(map(str, cmd)))
    for _ in range(3):
        t0 = time.perf_counter()
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}")
        if want in p.stdout:
            return p.stdout, seconds
        log("(output incomplete: again)")
    raise SystemExit(f"no {want!r} in the output of {cmd[0]}:\n{p.stdout[-3000:]}")


def final_ppl(output: str) -> dict:
    """The final figure, and the evaluation's seconds (load and tokenization left out) where the output
    tells: purelm's closing note, or llama.cpp's log stamps (M.SS.mmm.uuu) from 'calculating' to 'Final'."""
    m = FINAL.search(output)
    if not m:
        raise SystemExit(f"no 'Final estimate' line in:\n{output[-2000:]}")
    out = {"ppl": float(m.group(1)), "ppl_error": float(m.group(2))}
    ours = re.search(r"tokens scored in ([0-9.]+) s", output)
    stamps = [re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating", output, re.M),
              re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate", output, re.M)]
    if ours:
        out["eval_seconds"] = float(ours.group(1))
    elif all(stamps):
        t = [int(s[1]) * 60 + int(s[2]) + int(s[3]) / 1e3 + int(s[4]) / 1e6 for s in stamps]
        out["eval_seconds"] = round(t[1] - t[0], 2)
    return out


def statistics(output: str) -> dict:
    """The 'Name: value ± error' lines after '====== Perplexity statistics' (same layout in both tools)."""
    out = {}
    start = output.find("====== Perplexity statistics")
    for line in output[start:].splitlines() if start >= 0 else []:
        line = re.sub(r"^\d+\.\d+\.\d+\.\d+ [IWE] ", "", line.strip())  # llama.cpp's log prefix, if any
        m = STAT.match(line)
        if m:
            out[re.sub(r"\s+", " ", m.group(1)).strip()] = float(m.group(2)) if m.group(3) is None else \
                [float(m.group(2)), float(m.group(3))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--text", default=str(GPL3 if GPL3.exists() else HERE.parent / "tests/fixtures/agreement.txt"))
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--reps", type=int, default=1, help="alternating runs of each tool (default 1)")
    ap.add_argument("--llama-bin", default=str(LLAMA_BIN))
    ap.add_argument("--kl-base-model", default=None, help="KL divergence of --model from this model")
    ap.add_argument("--json", default=None, help="also save the JSON here")
    a = ap.parse_args()

    llama = [str(Path(a.llama_bin) / "llama-perplexity"), "-t", a.threads, "-c", a.ctx]
    purelm = [sys.executable, "-m", "purelm.cli", "perplexity", "--threads", a.threads, "-c", a.ctx]
    if a.chunks:
        llama += ["--chunks", a.chunks]
        purelm += ["--chunks", a.chunks]
    report: dict = {"model": a.model, "text": a.text, "ctx": a.ctx, "threads": a.threads, "chunks": a.chunks,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu()}
    if a.kl_base_model is None:
        runs: dict[str, list] = {"llama.cpp": [], "purelm": []}
        for _ in range(a.reps):
            for name, cmd in (("llama.cpp", llama + ["-m", a.model, "-f", a.text]),
                              ("purelm", purelm + [a.model, a.text])):
                out, seconds = run(cmd)
                runs[name].append({**final_ppl(out), "seconds": round(seconds, 2)})
                log(name, runs[name][-1])
        report.update(runs)
        p, q = runs["purelm"][0]["ppl"], runs["llama.cpp"][0]["ppl"]
        report["ppl_ratio"] = p / q
        best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
        report["seconds_ratio"] = best["purelm"] / best["llama.cpp"]
        if all("eval_seconds" in r for rs in runs.values() for r in rs):
            best = {name: min(r["eval_seconds"] for r in rs) for name, rs in runs.items()}
            report["eval_seconds_ratio"] = best["purelm"] / best["llama.cpp"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            base_llama, base_purelm = os.path.join(tmp, "base.llama"), os.path.join(tmp, "base.purelm")
            out, t_l = run(llama + ["-m", a.kl_base_model, "-f", a.text, "--kl-divergence-base", base_llama])
            out2, t_p = run(purelm + [a.kl_base_model, a.text, "--kl-divergence-base", base_purelm])
            report["base"] = {"llama.cpp": {**final_ppl(out), "seconds": round(t_l, 2)},
                              "purelm": {**final_ppl(out2), "seconds": round(t_p, 2)}}
            kld = [("llama.cpp", llama + ["-m", a.model, "--kl-divergence-base", base_llama, "--kl-divergence"]),
                   ("purelm", purelm[:-2] + [a.model, "--kl-divergence-base", base_purelm, "--kl-divergence"]),
                   ("purelm on llama.cpp's base", purelm[:-2] + [a.model, "--kl-divergence-base", base_llama,
                                                                 "--kl-divergence"])]
            for name, cmd in kld:
                out, seconds = run(cmd, "Same top p")
                report[name] = {"seconds": round(seconds, 2), **statistics(out)}
                log(name, json.dumps(report[name])[:400])
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
