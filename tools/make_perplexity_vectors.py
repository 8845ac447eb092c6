"""Write tests/fixtures/perplexity/: llama.cpp's `llama-perplexity` figures on the tiny LLaMA fixture and
tests/fixtures/agreement.txt, so that the tests compare `purelm perplexity` with llama.cpp without it.

  llama_cpp.json     per case (model, -c, --chunks, BOS or not): the running PPL after each chunk and
                     the final "PPL = x +/- y", as llama-perplexity printed them
  llama-f32-c32.kld  llama-perplexity's --kl-divergence-base file for llama-f32.gguf, -c 32, 2 chunks
                     (its format, written by llama.cpp: the reader is tested on it)

The "bos" cases run on a copy of llama-f32.gguf with tokenizer.ggml.add_bos_token = true (the tests
make the same copy), so the BOS-per-chunk rule is checked against llama.cpp too.

    python tools/make_perplexity_vectors.py [--llama-bin DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "perplexity"
LLAMA_BIN = Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
CASES = [  # (name, model, ctx, chunks)
    ("f32-c64", "llama-f32.gguf", 64, 8),
    ("f32-c33", "llama-f32.gguf", 33, 6),
    ("q8_0-c64", "llama-q8_0.gguf", 64, 8),
    ("bos-c48", "bos", 48, 6),
]


def bos_copy(dst: Path) -> Path:
    """llama-f32.gguf with add_bos_token = true."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import rewrite_gguf

    return Path(rewrite_gguf(FIX / "llama-f32.gguf", dst, meta={"tokenizer.ggml.add_bos_token": True}))


def run(binary: Path, model: Path, ctx: int, chunks: int, *extra: str) -> str:
    cmd = [str(binary), "-m", str(model), "-f", str(FIX / "agreement.txt"), "-c", str(ctx), "--chunks",
           str(chunks), "-t", "1", *extra]
    for _ in range(5):  # llama.cpp's log thread sometimes loses its last lines at exit: run again
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode == 0 and "Final estimate" in p.stdout:
            return p.stdout
    raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", default=str(LLAMA_BIN))
    binary = Path(ap.parse_args().llama_bin) / "llama-perplexity"
    OUT.mkdir(exist_ok=True)
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        bos = bos_copy(Path(tmp) / "llama-bos.gguf")
        for name, model, ctx, chunks in CASES:
            out = run(binary, bos if model == "bos" else FIX / model, ctx, chunks)
            final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
            running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
            cases[name] = {"model": model, "ctx": ctx, "chunks": chunks, "running": running,
                           "ppl": float(final.group(1)), "ppl_error": float(final.group(2))}
        out = run(binary, FIX / "llama-f32.gguf", 32, 2, "--kl-divergence-base", str(OUT / "llama-f32-c32.kld"))
        final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
        cases["base-file"] = {"model": "llama-f32.gguf", "ctx": 32, "chunks": 2, "file": "llama-f32-c32.kld",
                              "ppl": float(final.group(1)), "ppl_error": float(final.group(2))}
    (OUT / "llama_cpp.json").write_text(json.dumps(
        {"made_with": "llama-perplexity of llama-cpp-python 0.3.36's vendor/llama.cpp (native build), "
                      "text tests/fixtures/agreement.txt, -t 1", "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
