"""`purelm quantize` against llama.cpp's `llama-quantize`: the same tensor types, the same bytes, and times.

For an f16 model (default: SmolLM2-135M, dequantized from the cached Q4_1 file into /tmp by `purelm
quantize --allow-requantize ... f16`) it runs both tools, as processes on the same threads, for every
TYPE (each mix, --pure runs of the K types), and with an importance matrix made by `llama-imatrix` on
tests/fixtures/agreement.txt for Q4_K_M and IQ4_NL. Per run it reports: tensors whose type differs,
tensors whose bytes differ (with the fraction of identical blocks in each), and both wall times.
`--big` does Q4_K_M of the synthetic 1.1B written at f16 (benchmarks/make_synthetic.py --type f16; 2.2 GB
in /tmp, deleted at the end).

    python benchmarks/quantize_check.py                      # SmolLM2, every type
    python benchmarks/quantize_check.py --types Q4_K_M,Q6_K --no-imatrix
    python benchmarks/quantize_check.py --big --json benchmarks/results/quantize-check.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from purelm.formats.gguf import GGUFFile  # noqa: E402
from purelm.quant.types import BLOCK_INFO  # noqa: E402

LLAMA_BIN = Path("/root/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
SMOLLM2_Q4_1 = Path.home() / ".cache" / "purelm" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
         "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "Q2_K/pure", "Q3_K/pure", "Q4_K/pure", "Q5_K/pure", "Q6_K/pure"]
IMATRIX_TYPES = ["Q4_K_M/imatrix", "IQ4_NL/imatrix"]


def run(args: list[str], what: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{what} failed ({' '.join(args)}):\n{r.stderr[-3000:]}")
    return seconds


def compare(ours: Path, theirs: Path) -> dict:
    """Types and bytes per tensor; where bytes differ, the fraction of identical blocks."""
    a, b = GGUFFile(ours), GGUFFile(theirs)
    if sorted(a.tensors) != sorted(b.tensors):
        return {"tensor_names_differ": sorted(set(a.tensors) ^ set(b.tensors))}
    type_diff, byte_diff, n_same = {}, {}, 0
    for name, tb in b.tensors.items():
        ta = a.tensors[name]
        if ta.type != tb.type:
            type_diff[name] = f"{ta.type.name} (llama.cpp: {tb.type.name})"
            continue
        if np.array_equal(ta.data, tb.data):
            n_same += 1
            continue
        size = BLOCK_INFO[ta.type][1]
        blocks_a, blocks_b = ta.data.reshape(-1, size), tb.data.reshape(-1, size)
        same = float(np.mean(np.all(blocks_a == blocks_b, axis=1)))
        byte_diff[name] = {"type": ta.type.name, "identical_blocks": round(same, 6)}
    return {"tensors": len(b.tensors), "identical_tensors": n_same, "type_differs": type_diff,
            "bytes_differ": byte_diff, "order_same": list(a.tensors) == list(b.tensors),
            "identical": not type_diff and not byte_diff}


def check(src: Path, key: str, tmp: Path, bin_dir: Path, threads: int, imatrix: Path | None, reps: int = 1) -> dict:
    """Both tools on one run, alternating `reps` times (the best time of each), then the comparison."""
    ftype, _, flag = key.partition("/")
    flags = ["--pure"] if flag == "pure" else ["--imatrix", str(imatrix)] if flag == "imatrix" else []
    theirs, ours = tmp / "llama-out.gguf", tmp / "purelm-out.gguf"
    t_llama = t_purelm = float("inf")
    for _ in range(reps):
        t_llama = min(t_llama, run([str(bin_dir / "llama-quantize"), *flags, str(src), str(theirs), ftype,
                                    str(threads)], "llama-quantize"))
        t_purelm = min(t_purelm, run([sys.executable, "-m", "purelm.cli", "quantize", *flags, "--quiet", "-t",
                                      str(threads), str(src), str(ours), ftype], "purelm quantize"))
    result = {"run": key, "llama_quantize_s": round(t_llama, 2), "purelm_s": round(t_purelm, 2),
              "ratio": round(t_purelm / t_llama, 2), **compare(ours, theirs)}
    for p in (theirs, ours):
        p.unlink()
    return result


def make_smollm2_f16(path: Path) -> None:
    if not path.exists():
        run([sys.executable, "-m", "purelm.cli", "quantize", "--allow-requantize", "--quiet", str(SMOLLM2_Q4_1),
             str(path), "f16"], "purelm quantize to f16")


def summary_line(r: dict) -> str:
    status = "identical" if r.get("identical") else (
        f"types differ: {len(r.get('type_differs', {}))}, bytes differ: "
        + ", ".join(f"{n} ({v['type']}, {100 * v['identical_blocks']:.2f}% blocks same)"
                    for n, v in list(r.get("bytes_differ", {}).items())[:3]))
    return (f"{r['model']:8} {r['run']:15} llama-quantize {r['llama_quantize_s']:7.2f} s  purelm {r['purelm_s']:7.2f} s "
            f"({r['ratio']:.2f}x)  {status}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="an f16 GGUF (default: SmolLM2 at f16 in /tmp)")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated runs (TYPE or TYPE/pure)")
    ap.add_argument("--no-imatrix", action="store_true", help="skip the llama-imatrix runs")
    ap.add_argument("--big", action="store_true", help="also Q4_K_M of the synthetic 1.1B at f16")
    ap.add_argument("--reps", type=int, default=1, help="runs of each tool per TYPE, alternating; best time kept")
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/purelm-quantize-check"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)
    a.tmp.mkdir(parents=True, exist_ok=True)
    models = []
    src = a.model or a.tmp / "smollm2-f16.gguf"
    if a.model is None:
        make_smollm2_f16(src)
    runs = [k for k in a.types.split(",") if k]  # --types "" --no-imatrix --big: the 1.1B alone
    imatrix = None
    if not a.no_imatrix:
        imatrix = a.tmp / "smollm2-imatrix.gguf"
        if not imatrix.exists():
            run([str(a.llama_bin / "llama-imatrix"), "-m", str(src), "-f", str(ROOT / "tests/fixtures/agreement.txt"),
                 "-o", str(imatrix), "-t", str(a.threads), "-c", "512", "--no-ppl"], "llama-imatrix")
        runs += IMATRIX_TYPES
    models.append(("smollm2", src, runs, imatrix))
    big = None
    if a.big:
        big = a.tmp / "synthetic-1.1b-f16.gguf"
        run([sys.executable, str(ROOT / "benchmarks/make_synthetic.py"), str(big), "--type", "f16", "--output-type",
             "f16", "--no-verify", "--quiet"], "make_synthetic")
        models.append(("1.1b", big, ["Q4_K_M"], None))
    results = []
    try:
        for label, path, keys, imat in models:
            for key in keys:
                r = {"model": label, **check(path, key, a.tmp, a.llama_bin, a.threads, imat, a.reps)}
                results.append(r)
                print(summary_line(r), flush=True)
    finally:
        if big is not None and big.exists():
            big.unlink()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": a.threads, "reps": a.reps,
              "load_average_at_end": os.getloadavg(), "llama_quantize": str(a.llama_bin / "llama-quantize"),
              "models": {label: str(path) for label, path, _, _ in models}, "results": results,
              "identical_runs": sum(bool(r.get("identical")) for r in results), "runs": len(results)}
    print(f"{report['identical_runs']} of {report['runs']} runs byte-identical to llama-quantize")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["identical_runs"] == report["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
