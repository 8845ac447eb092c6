"""`purelm imatrix` against llama.cpp's `llama-imatrix`: same file, text, -c, chunks and threads.

Each tool runs as its own process, the two taking turns (--reps times), so that noise from other jobs on
the machine hits both; wall times (whole command: load, tokenize, evaluate, write) and how far the two
matrices are apart (the same entries and counts are required; per entry, the largest gap of its sums
over its largest sum) are printed and saved as JSON.

    python benchmarks/imatrix_check.py                    # SmolLM2 Q4_1 on GPL-3, -c 512, 2 threads
    python benchmarks/imatrix_check.py --model /tmp/tinyllama-synth-q4_0.gguf --chunks 2

Options: --llama-bin DIR (llama-imatrix's folder), --text FILE, -c, --chunks, --threads, --reps,
--process-output, --json OUT. Prints one JSON document on stdout (progress on stderr).
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
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from purelm.formats.gguf import GGUFFile  # noqa: E402

LLAMA_BIN = Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
SMOLLM2 = Path.home() / ".cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def timed(cmd: list[str]) -> float:
    log("$", " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return time.perf_counter() - t0


def gaps(ours: Path, theirs: Path) -> dict:
    a, b = GGUFFile(ours), GGUFFile(theirs)
    if dict(a.metadata) != dict(b.metadata) or list(a.tensors) != list(b.tensors):
        raise SystemExit(f"the files differ in metadata or entries: {dict(a.metadata)} / {dict(b.metadata)}")
    out, counts_equal = {}, True
    for name, t in b.tensors.items():
        x, y = a.tensors[name].dequantize(), t.dequantize()
        if name.endswith(".counts"):
            counts_equal &= bool((x == y).all())
        else:
            out[name[: -len(".in_sum2")]] = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
    worst = max(out, key=out.get)
    return {"entries": len(out), "counts_equal": counts_equal, "median_gap": statistics.median(out.values()),
            "largest_gap": out[worst], "largest_gap_entry": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SMOLLM2)
    ap.add_argument("--text", type=Path, default=GPL3)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--process-output", action="store_true")
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    common = ["-f", a.text, "-c", a.ctx, "--chunks", a.chunks, "-t", a.threads] + \
        (["--process-output"] if a.process_output else [])
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours.gguf", Path(tmp) / "theirs.gguf"
        cmd_ours = [sys.executable, "-m", "purelm.cli", "imatrix", a.model, *common, "-o", ours]
        cmd_theirs = [a.llama_bin / "llama-imatrix", "-m", a.model, *common, "-o", theirs]
        timed(cmd_ours)  # warm-up: numba's kernels loaded, the file in the page cache
        times: dict[str, list[float]] = {"purelm": [], "llama.cpp": []}
        for rep in range(a.reps):  # alternating, the order swapped every repetition
            for engine in (["purelm", "llama.cpp"] if rep % 2 == 0 else ["llama.cpp", "purelm"]):
                times[engine].append(timed(cmd_ours if engine == "purelm" else cmd_theirs))
                log(f"  {engine}: {times[engine][-1]:.2f} s")
        agreement = gaps(ours, theirs)
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {"command": " ".join(sys.argv), "model": str(a.model), "text": str(a.text), "ctx": a.ctx,
           "chunks": a.chunks, "threads": a.threads, "process_output": a.process_output,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
           "seconds": times, "median_seconds": med, "purelm_speed_vs_llama_cpp": med["llama.cpp"] / med["purelm"],
           "agreement": agreement}
    text = json.dumps(doc, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
