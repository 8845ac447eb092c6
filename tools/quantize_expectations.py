"""Record llama-quantize's per-tensor type choices, for tests/test_quantize_cmd.py.

    python tools/quantize_expectations.py [--llama-bin DIR]   # writes tests/fixtures/quantize_expectations.json

For every TYPE (each mix, plus --pure runs of the K types and runs with an importance matrix where the
rules look at one) it runs llama.cpp's `llama-quantize` on
- small real models from tests/fixtures (llama, a GQA mistral, falcon) and a generated f16 one whose rows
  split into 256-weight blocks (write_kmodel): full runs, the output read back with the `gguf` package,
  each tensor's type and a hash of its bytes recorded;
- shape tables of bigger models (SmolLM2-135M, TinyLlama-1.1B, a 16-layer GQA model with 256-wide rows,
  a Mixtral-like model with 8 experts):
  a GGUF header with those tensors over a sparse file (no data is ever read), run with --dry-run, the
  chosen types parsed from its log.
It records, per model: its tensors ("name rows x cols TYPE", numpy order), the order llama-quantize visits
them in, and per run the type it gave each tensor (in the table's order, run-length coded). The importance
matrix is a GGUF one in llama-imatrix's layout, written here; and for the llama fixture, llama-imatrix's own
files (GGUF and legacy .dat, committed beside it) with what llama-quantize makes from each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType  # noqa: E402
from purelm.quant.types import GGMLType  # noqa: E402

LLAMA_BIN = Path("/root/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
FIX_DIR = ROOT / "tests" / "fixtures"
OUT = FIX_DIR / "quantize_expectations.json"
SMOLLM2 = Path.home() / ".cache" / "purelm" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MIXES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
         "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "F16", "BF16", "F32"]
PURE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
WITH_IMATRIX = ["Q4_0", "Q5_0", "IQ4_NL", "Q4_K_M", "Q2_K"]
FIXTURES = ["llama-f16", "mistral_gqa-f16", "falcon-f16"]


def runs() -> list[tuple[str, list[str]]]:
    """(run key, llama-quantize flags before the files) for every run."""
    return ([(t, []) for t in MIXES] + [(f"{t}/pure", ["--pure"]) for t in PURE]
            + [(f"{t}/imatrix", ["--imatrix"]) for t in WITH_IMATRIX])


class SparseWriter(GGUFWriter):
    """Writes the header and leaves the tensor data a hole of the right size."""

    def _write_to(self, tmp, head, total, progress) -> None:  # type: ignore[override]
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(b"\0" * (-len(head) % self.alignment))
            f.truncate(f.tell() + total)


def llama_meta(arch: str, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> dict:
    p = arch
    return {"general.architecture": arch, "general.name": f"shape-{hidden}x{layers}",
            f"{p}.vocab_size": vocab, f"{p}.context_length": 2048, f"{p}.embedding_length": hidden,
            f"{p}.block_count": layers, f"{p}.feed_forward_length": ffn, f"{p}.attention.head_count": heads,
            f"{p}.attention.head_count_kv": kv_heads, f"{p}.rope.dimension_count": hidden // heads,
            f"{p}.attention.layer_norm_rms_epsilon": 1e-5}


def llama_tensors(hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                  tied: bool) -> list[list]:
    kv = hidden // heads * kv_heads
    out = [["token_embd.weight", [vocab, hidden], "F16"], ["output_norm.weight", [hidden], "F32"]]
    if not tied:
        out.append(["output.weight", [vocab, hidden], "F16"])
    for i in range(layers):
        b = f"blk.{i}."
        out += [[b + "attn_norm.weight", [hidden], "F32"], [b + "ffn_norm.weight", [hidden], "F32"],
                [b + "attn_q.weight", [hidden, hidden], "F16"], [b + "attn_k.weight", [kv, hidden], "F16"],
                [b + "attn_v.weight", [kv, hidden], "F16"], [b + "attn_output.weight", [hidden, hidden], "F16"],
                [b + "ffn_gate.weight", [ffn, hidden], "F16"], [b + "ffn_up.weight", [ffn, hidden], "F16"],
                [b + "ffn_down.weight", [hidden, ffn], "F16"]]
    return out


def moe_tensors(hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int, experts: int) -> list[list]:
    """Mixtral's layout: the FFN as 3-D expert tensors (experts, rows, cols) and a router."""
    out = []
    for row in llama_tensors(hidden, layers, ffn, heads, kv_heads, vocab, tied=False):
        name = row[0]
        if ".ffn_" not in name or name.endswith("_norm.weight"):
            out.append(row)
        elif name.endswith("ffn_gate.weight"):
            b = name[: -len("ffn_gate.weight")]
            out += [[b + "ffn_gate_inp.weight", [experts, hidden], "F32"],
                    [b + "ffn_gate_exps.weight", [experts, ffn, hidden], "F16"],
                    [b + "ffn_up_exps.weight", [experts, ffn, hidden], "F16"],
                    [b + "ffn_down_exps.weight", [experts, hidden, ffn], "F16"]]
    return out


def shape_models() -> dict[str, dict]:
    models = {
        "tinyllama-1.1b": (llama_meta("llama", 2048, 22, 5632, 32, 4, 32000),
                           llama_tensors(2048, 22, 5632, 32, 4, 32000, tied=False)),
        "gqa256-16": (llama_meta("llama", 256, 16, 768, 8, 2, 1000), llama_tensors(256, 16, 768, 8, 2, 1000, False)),
        "moe8-4": ({**llama_meta("llama", 256, 4, 512, 8, 2, 1000), "llama.expert_count": 8,
                    "llama.expert_used_count": 2}, moe_tensors(256, 4, 512, 8, 2, 1000, 8)),
    }
    if SMOLLM2.exists():  # its real table and metadata, at f16
        f = GGUFFile(SMOLLM2)
        meta = {k: f.metadata[k] for k in f.metadata
                if k.startswith("llama.") or k in ("general.architecture", "general.name")}
        tensors = [[t.name, list(t.shape), "F32" if t.type == GGMLType.F32 else "F16"] for t in f.tensors.values()]
        models["smollm2-135m"] = (meta, tensors)
    return {name: {"metadata": meta, "tensors": tensors} for name, (meta, tensors) in models.items()}


def write_shape_model(path: Path, meta: dict, tensors: list[list]) -> None:
    w = SparseWriter(path)
    for key, value in meta.items():
        if key in ("general.file_type", "general.quantization_version"):
            continue
        w.add(key, value, ValueType.FLOAT32 if isinstance(value, float) else None)
    w.add("general.file_type", 1, ValueType.UINT32)
    for name, shape, t in tensors:
        w.add_tensor(name, None, GGMLType[t], tuple(shape))
    w.write()


def pseudo_random(n: int, key: int) -> np.ndarray:
    """n values in [-0.5, 0.5) from an integer hash of (index, key): the same bits on every machine and
    numpy version (no RNG stream, no libm)."""
    h = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(key * 40503 + 12345)) % np.uint64(1 << 32)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(1274126177)) % np.uint64(1 << 32)
    return (h >> np.uint64(8)).astype(np.float64) / float(1 << 24) - 0.5


KMODEL = dict(hidden=256, layers=2, ffn=256, heads=4, kv_heads=1, vocab=64)


MOE_EXPERTS = 4
MOE_RUNS = ["Q8_0", "Q2_K", "Q4_K_M", "Q6_K", "IQ4_NL", "Q4_0/imatrix", "Q4_K_M/imatrix", "IQ4_NL/imatrix"]


def write_kmodel(path: Path, moe: bool = False) -> None:
    """A small f16 LLaMA whose rows split into 256-weight blocks (so the K types are used, not their
    fallbacks), with deterministic weights (a few 4x outliers, as real weights have). moe: its FFN as
    MOE_EXPERTS experts (3-D tensors, whose importance matrix has one row per expert)."""
    c = KMODEL
    w = GGUFWriter(path)
    meta = llama_meta("llama", c["hidden"], c["layers"], c["ffn"], c["heads"], c["kv_heads"], c["vocab"])
    if moe:
        meta.update({"llama.expert_count": MOE_EXPERTS, "llama.expert_used_count": 2})
    for key, value in meta.items():
        w.add(key, value, ValueType.FLOAT32 if isinstance(value, float) else None)
    w.add("general.file_type", 1, ValueType.UINT32)
    shape = (c["hidden"], c["layers"], c["ffn"], c["heads"], c["kv_heads"], c["vocab"])
    tensors = moe_tensors(*shape, MOE_EXPERTS) if moe else llama_tensors(*shape, tied=False)
    for key, (name, shape, t) in enumerate(tensors):
        x = pseudo_random(int(np.prod(shape)), key)
        if t == "F32":
            w.add_tensor(name, (1.0 + 0.1 * x).astype(np.float32).reshape(shape))
        else:
            x[::37] *= 4.0
            w.add_tensor(name, (0.05 * x).astype(np.float16).reshape(shape))
    w.write()


def write_imatrix(path: Path, tensors: list[list]) -> None:
    """llama-imatrix's GGUF layout: <name>.in_sum2 (ne0 x 1) and <name>.counts (1 x 1), F32, for every
    matrix but token_embd (llama-imatrix sees only matrix products). Sums are varied, counts 7, so the
    division llama-quantize makes matters."""
    w = GGUFWriter(path)
    w.add("general.type", "imatrix")
    w.add("imatrix.datasets", ["pseudo-random"], ValueType.ARRAY, ValueType.STRING)
    w.add("imatrix.chunk_count", 1, ValueType.UINT32)
    w.add("imatrix.chunk_size", 512, ValueType.UINT32)
    for key, (name, shape, _) in enumerate(sorted(tensors)):
        if len(shape) >= 2 and name != "token_embd.weight":
            n_mat = shape[0] if len(shape) == 3 else 1  # experts: one row of sums and one count each
            sums = 7.0 * (1.0 + 4.0 * (pseudo_random(n_mat * shape[-1], 1000 + key) + 0.5) ** 2)
            w.add_tensor(name + ".in_sum2", sums.astype(np.float32).reshape(n_mat, shape[-1]))
            w.add_tensor(name + ".counts", np.full((n_mat, 1), 7.0, np.float32))
    w.write()


LOG_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB"
                      r"(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def run_llama_quantize(bin_dir: Path, src: Path, dst: Path, ftype: str, flags: list[str], imatrix: Path,
                       dry: bool) -> dict[str, str]:
    args = [str(bin_dir / "llama-quantize")]
    for flag in flags:
        args += [flag, str(imatrix)] if flag == "--imatrix" else [flag]
    args += ["--dry-run"] if dry else []
    args += [str(src), str(dst), ftype, "2"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-quantize failed ({' '.join(args)}):\n{r.stderr[-2000:]}")
    if not dry:
        from gguf import GGUFReader  # the oracle reads the output

        reader = GGUFReader(dst)
        types = {t.name: (t.tensor_type.name, tensor_hash(bytes(t.data.reshape(-1).view(np.uint8))))
                 for t in reader.tensors}
        del reader
        os.unlink(dst)
        return types
    types = {}
    for line in (r.stdout + r.stderr).splitlines():
        m = LOG_LINE.match(line)
        if m:
            types[m.group(1)] = ((m.group(3) or m.group(2)).upper(), None)
    return types


def tensor_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def run_length(items: list[str]) -> str:
    """"Q4_0*3 Q6_K" for Q4_0 Q4_0 Q4_0 Q6_K (tests/test_quantize_cmd.py reads it back)."""
    out: list[list] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return " ".join(f"{t}*{n}" if n > 1 else t for t, n in out)


IMATRIX_FIXTURES = [FIX_DIR / "llama-f16.imatrix.gguf", FIX_DIR / "llama-f16.imatrix.dat"]
REAL_IMATRIX_RUNS = ["Q4_0", "Q5_0", "IQ4_NL", "Q4_K_M", "Q2_K"]


def real_imatrix(bin_dir: Path, tmp: Path) -> dict:
    """llama-imatrix's own files (both forms) for the llama fixture, and what llama-quantize makes with
    each: so the tests check purelm's reader on files that tool wrote."""
    src = FIX_DIR / "llama-f16.gguf"
    for path, form in zip(IMATRIX_FIXTURES, ("gguf", "dat")):
        args = [str(bin_dir / "llama-imatrix"), "-m", str(src.relative_to(ROOT)), "-f", "tests/fixtures/agreement.txt",
                "-o", str(path.relative_to(ROOT)), "--output-format", form, "-c", "128", "--no-ppl", "-t", "1"]
        r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"llama-imatrix failed:\n{r.stderr[-2000:]}")
    names = [t.name for t in GGUFFile(src).tensors.values()]
    out: dict = {"files": [str(p.relative_to(ROOT)) for p in IMATRIX_FIXTURES], "runs": {}}
    for path in IMATRIX_FIXTURES:
        for ftype in REAL_IMATRIX_RUNS:
            types = run_llama_quantize(bin_dir, src, tmp / "out.gguf", ftype, ["--imatrix"], path, False)
            out["runs"][f"{ftype}/{path.suffix[1:]}"] = {"choices": run_length([types[n][0] for n in names]),
                                                       "sha256": " ".join(types[n][1] for n in names)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="folder with llama-quantize")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    result: dict = {"llama_quantize": str(a.llama_bin / "llama-quantize"), "runs": [k for k, _ in runs()],
                    "kmodel": KMODEL,
                    "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for name in FIXTURES:
            f = GGUFFile(ROOT / "tests" / "fixtures" / f"{name}.gguf")
            models[name] = {"fixture": f"tests/fixtures/{name}.gguf",
                            "tensors": [[t.name, list(t.shape), t.type.name] for t in f.tensors.values()]}
        write_kmodel(tmp / "kmodel-f16.gguf")
        write_kmodel(tmp / "kmoe-f16.gguf", moe=True)
        for name in ("kmodel-f16", "kmoe-f16"):
            models[name] = {"fixture": f"generated by write_kmodel{'(moe=True)' if 'moe' in name else ''}",
                            "tensors": [[t.name, list(t.shape), t.type.name]
                                        for t in GGUFFile(tmp / f"{name}.gguf").tensors.values()]}
        models["kmoe-f16"]["runs"] = MOE_RUNS  # a few: the others add nothing over kmodel-f16
        models.update(shape_models())
        for name, model in models.items():
            dry = "fixture" not in model
            src = tmp / f"{name}.gguf" if dry or name.startswith("km") else ROOT / model["fixture"]
            if dry:
                write_shape_model(src, model["metadata"], model["tensors"])
            imatrix = tmp / f"{name}.imatrix.gguf"
            write_imatrix(imatrix, model["tensors"])
            names = [t[0] for t in model["tensors"]]
            model["choices"] = {}
            if not dry:
                model["sha256"] = {}
            for key, flags in runs():
                if key not in model.get("runs", [key]):
                    continue
                types = run_llama_quantize(a.llama_bin, src, tmp / "out.gguf", key.split("/")[0], flags,
                                           imatrix, dry)
                if sorted(types) != sorted(names):
                    raise SystemExit(f"{name} {key}: tensors parsed do not match the model's")
                model["order"] = list(types)  # the order llama-quantize visits (and writes) them
                model["choices"][key] = run_length([types[n][0] for n in names])
                if not dry:  # each tensor's data, as the first 12 hex digits of its sha256
                    model["sha256"][key] = " ".join(types[n][1] for n in names)
                print(f"{name:16} {key:14} {model['choices'][key][:80]}", file=sys.stderr)
            meta = model.pop("metadata", None) or GGUFFile(src).metadata
            arch = meta["general.architecture"]
            model["hparams"] = {k: int(meta[k]) if k != "general.architecture" else arch for k in
                                ("general.architecture", f"{arch}.block_count", f"{arch}.attention.head_count",
                                 f"{arch}.attention.head_count_kv", f"{arch}.expert_count") if k in meta}
            # one string per tensor, "name rows x cols TYPE" (numpy order), to keep the file small
            model["tensors"] = [f"{n} {'x'.join(map(str, shape))} {t}" for n, shape, t in model["tensors"]]
            result["models"][name] = model
        result["llama_imatrix"] = real_imatrix(a.llama_bin, tmp)
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    a.out.write_text(text + "\n")
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
