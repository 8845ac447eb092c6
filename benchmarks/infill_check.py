"""purelm's fill-in-the-middle prompts (`purelm.infill`, the server's `/infill`) against llama-server's.

llama-server's `/infill` reply carries the prompt it built (`prompt`, special tokens as text) and its
length (`tokens_evaluated`); this script sends it a set of requests (no extra files, extra files with
and without names, a prefix, suffix and extra files longer than their budgets, an empty gap with a
typed prompt) and compares both with `infill_ids` on the same file and context, then the greedy reply
of each engine (which may differ at near-ties of the two engines' arithmetic).

SmolLM2 has no FIM tokens: without `--model`, the script writes a copy of it (in a temporary folder)
that declares three of its special tokens FIM prefix / suffix / middle and <file_sep> FIM_SEP, as
tests/test_server.py does.

    python benchmarks/infill_check.py --llama-bin DIR [--model FILE.gguf] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import purelm  # noqa: E402
from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType  # noqa: E402
from purelm.hub import pull  # noqa: E402
from purelm.infill import infill_ids  # noqa: E402

CASES = [
    {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n"},
    {"input_prefix": "import numpy as np\n\nx = ", "input_suffix": "\ny = x * 2\n", "prompt": "np.",
     "input_extra": [{"filename": "util.py", "text": "import os\n" * 3}, {"text": "def f(): pass\n"}]},
    {"input_prefix": "word " * 1700, "input_suffix": "tail " * 700,
     "input_extra": [{"filename": "big.txt", "text": "line of text\n" * 800}]},
    {"input_prefix": "", "input_suffix": "", "prompt": "Hello"},
]


def fim_copy(src: Path, dst: Path) -> Path:
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for key, token in (("fim_pre", 11), ("fim_suf", 12), ("fim_mid", 13), ("fim_sep", 5)):  # SmolLM2's ids
        w.add(f"tokenizer.ggml.{key}_token_id", token, ValueType.UINT32)
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    f.close()
    return dst


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", required=True, type=Path, help="folder of llama.cpp's llama-server")
    ap.add_argument("--model", type=Path, help="a GGUF with FIM tokens (default: a SmolLM2 copy that declares some)")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--port", type=int, default=8097)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or fim_copy(pull("smollm2"), Path(tmp) / "smollm2-fim.gguf")
        llm = purelm.load(model, n_ctx=args.ctx)
        server = subprocess.Popen([str(args.llama_bin / "llama-server"), "-m", str(model), "-c", str(args.ctx),
                                   "-np", "1", "--port", str(args.port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{args.port}"
            for _ in range(120):
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            results = []
            for case in CASES:
                theirs = post(base + "/infill", {**case, "n_predict": 12, "temperature": 0, "cache_prompt": False})
                ids = infill_ids(llm.tokenizer, case["input_prefix"], case["input_suffix"], case.get("prompt", ""),
                                 [(e.get("filename", "tmp"), e["text"]) for e in case.get("input_extra", [])],
                                 n_ctx=args.ctx)
                mine = llm.generate(ids, max_tokens=12, temperature=0) if len(ids) < args.ctx - 12 else None
                results.append({"tokens": len(ids), "llama_cpp_tokens": theirs["tokens_evaluated"],
                                "same_prompt": theirs["prompt"] == llm.tokenizer.decode(ids),
                                "reply": mine, "llama_cpp_reply": theirs["content"]})
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            server.terminate()
            server.wait(30)
    report = {"model": str(args.model or "smollm2 with FIM tokens declared"), "ctx": args.ctx, "results": results,
              "all_prompts_equal": all(r["same_prompt"] and r["tokens"] == r["llama_cpp_tokens"] for r in results)}
    out = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(out + "\n")
    print(out)


if __name__ == "__main__":
    main()
