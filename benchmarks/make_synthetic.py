"""Write a synthetic LLaMA GGUF file with random quantized weights, for benchmarks.

The default shape is TinyLlama-1.1B's (hidden 2048, 22 layers, ffn 5632, 32 heads, 4 kv heads, vocab
32000, context 2048), so the file costs what a real 1.1B Q4_0 model costs to run, without downloading one.
Its metadata is what llama.cpp's converter writes for a LLaMA with a SentencePiece vocabulary, so
llama.cpp (and llama-cpp-python) load it too: the vocabulary is `<unk>`, `<s>`, `</s>`, the 256
`<0xNN>` byte tokens, then made-up pieces ("▁a", "ab", ...), with scores and token types.

Weights are random normal * 0.02 (norms: ones), generated and quantized one tensor at a time when the
writer reaches it, so memory stays near the largest tensor (token_embd: 32000 x 2048 float32 = 250 MB).
Seeded: the same arguments give a byte-identical file.

    python benchmarks/make_synthetic.py /tmp/tinyllama-synth-q4_0.gguf
    python benchmarks/make_synthetic.py /tmp/tinyllama-synth-f16.gguf --type f16 --output-type f16
                                                    # unquantized (2.2 GB), e.g. for `purelm quantize`
    python benchmarks/make_synthetic.py tiny.gguf --hidden 64 --layers 2 --ffn 128 --heads 4 \
        --kv-heads 2 --vocab 512 --ctx 256          # a tiny one, for tests
    python benchmarks/make_synthetic.py /tmp/qwen3moe-synth-q4_0.gguf --moe
                                                    # Qwen3-MoE-shaped, 2.0B total, 0.38B active

`--lora-for MODEL` writes a random LoRA adapter for MODEL instead (llama.cpp's adapter layout, as its
convert_lora_to_gguf.py writes one; see write_lora):

    python benchmarks/make_synthetic.py /tmp/smollm2-lora.gguf --lora-for smollm2.gguf --rank 16

`--bert` writes a `bert` embedding model instead, BGE-small's shape (12 layers of width 384, 12 heads, ffn
1536, vocabulary 30522, 512 positions; F16 weights unless --type says otherwise), with a WordPiece
vocabulary of made-up words ("▁a" ... and continuation pieces) that benchmarks/embed_bench.py writes
its texts with, one token a word.

`--moe` writes a `qwen3moe` model instead (per-head q/k norms, a router and 3-D expert tensors in every
layer): by default 24 layers of width 1024, 8 heads of 128 (4 kv heads), 64 experts of width 384 with 8
picked per token. Each token reads as many weight bytes as the dense model of `--moe-dense-twin` (the same
attention and q/k norms, ffn = 8 x 384: a dense qwen3), which benchmarks/moe_bench.py decodes beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import string
import sys
import time
from pathlib import Path

import numpy as np

from purelm.formats.gguf import GGUFWriter, ValueType
from purelm.quant import SUPPORTED_QUANT, GGMLType, quantize

# llama.cpp's llama_token_type / gguf.TokenType
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
# gguf.LlamaFileType for the bulk of the weights
FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7,
              GGMLType.Q5_0: 8, GGMLType.Q5_1: 9}
SPIECE = "\u2581"  # ▁, SentencePiece's word-boundary mark


def spm_vocab(n_vocab: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """tokens, scores (float32), token types (int32) of a llama-style SentencePiece vocabulary."""
    if n_vocab < 3 + 256 + 1:
        raise ValueError(f"vocab must be at least 260 (3 specials, 256 byte tokens, '▁'), got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    n_special = len(tokens)

    def pieces():
        yield SPIECE
        for c in string.ascii_letters + string.digits + string.punctuation:
            yield SPIECE + c
            yield c
        for n in itertools.count(2):
            for combo in itertools.product(string.ascii_lowercase, repeat=n):
                word = "".join(combo)
                yield SPIECE + word
                yield word

    tokens += list(itertools.islice(pieces(), n_vocab - n_special))
    types += [NORMAL] * (n_vocab - n_special)
    scores = np.zeros(n_vocab, np.float32)
    scores[n_special:] = -np.arange(n_vocab - n_special, dtype=np.float32)  # earlier pieces merge first
    return tokens, scores, np.asarray(types, np.int32)


# --moe and --moe-dense-twin: Qwen3-MoE's proportions at 2.0B parameters (0.38B read per token)
MOE_SHAPE = {"hidden": 1024, "layers": 24, "heads": 8, "kv_heads": 4, "ffn": 3072}


def build_writer(path: str | Path, hidden: int = 2048, layers: int = 22, ffn: int = 5632, heads: int = 32,
                 kv_heads: int = 4, vocab: int = 32000, ctx: int = 2048, qtype: GGMLType = GGMLType.Q4_0,
                 output_type: GGMLType = GGMLType.Q8_0, embd_type: GGMLType | None = None,
                 seed: int = 0, std: float = 0.02, experts: int = 0, experts_used: int = 0,
                 expert_ffn: int = 0, qwen3: bool = False) -> GGUFWriter:
    """A GGUFWriter holding the metadata and lazy (generated on write) tensors. With `experts`, a
    qwen3moe model: every layer's feed-forward is `experts` experts of width `expert_ffn`; `qwen3`: a
    dense qwen3 model (LLaMA with RMS norms of each q and k head)."""
    embd_type = embd_type or qtype
    for t in (qtype, output_type, embd_type):
        if t not in SUPPORTED_QUANT:
            raise ValueError(f"cannot write {t.name}: purelm quantizes only "
                             f"{', '.join(sorted(x.name for x in SUPPORTED_QUANT))}")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv-heads")
    head_dim = hidden // heads
    kv_dim = head_dim * kv_heads

    if experts and not 1 <= experts_used <= experts:
        raise ValueError("experts_used must be in [1, experts]")
    arch = "qwen3moe" if experts else "qwen3" if qwen3 else "llama"
    w = GGUFWriter(path)
    U32, F32 = ValueType.UINT32, ValueType.FLOAT32
    w.add("general.architecture", arch)
    w.add("general.type", "model")
    w.add("general.name", f"synthetic-{arch}-{hidden}x{layers}")
    w.add("general.quantization_version", 2, U32)
    w.add("general.file_type", FILE_TYPES.get(qtype, 2), U32)
    w.add(f"{arch}.vocab_size", vocab, U32)
    w.add(f"{arch}.context_length", ctx, U32)
    w.add(f"{arch}.embedding_length", hidden, U32)
    w.add(f"{arch}.block_count", layers, U32)
    w.add(f"{arch}.feed_forward_length", ffn, U32)
    w.add(f"{arch}.rope.dimension_count", head_dim, U32)
    w.add(f"{arch}.attention.head_count", heads, U32)
    w.add(f"{arch}.attention.head_count_kv", kv_heads, U32)
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, F32)
    w.add(f"{arch}.rope.freq_base", 10000.0, F32)
    if experts:
        w.add(f"{arch}.expert_count", experts, U32)
        w.add(f"{arch}.expert_used_count", experts_used, U32)
        w.add(f"{arch}.expert_feed_forward_length", expert_ffn, U32)
    tokens, scores, types = spm_vocab(vocab)
    w.add("tokenizer.ggml.model", "llama")
    w.add("tokenizer.ggml.pre", "default")
    w.add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
    w.add("tokenizer.ggml.scores", scores, ValueType.ARRAY, ValueType.FLOAT32)
    w.add("tokenizer.ggml.token_type", types, ValueType.ARRAY, ValueType.INT32)
    w.add("tokenizer.ggml.bos_token_id", 1, U32)
    w.add("tokenizer.ggml.eos_token_id", 2, U32)
    w.add("tokenizer.ggml.unknown_token_id", 0, U32)
    w.add("tokenizer.ggml.padding_token_id", 2, U32)
    w.add("tokenizer.ggml.add_bos_token", True, ValueType.BOOL)
    w.add("tokenizer.ggml.add_eos_token", False, ValueType.BOOL)

    index = itertools.count()

    def matrix(name: str, rows: int, cols: int, t: GGMLType, n: int = 0) -> None:
        """A (rows, cols) matrix; with n, n of them stacked (n, rows, cols): experts."""
        key = next(index)  # each tensor its own stream: the file does not depend on write order
        shape = (n, rows, cols) if n else (rows, cols)
        rows = rows * max(n, 1)

        def make() -> np.ndarray:
            rng = np.random.default_rng([seed, key])
            out = None
            step = max(1, (16 << 20) // cols)  # 16M floats (64 MB) generated at a time
            for r in range(0, rows, step):
                x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
                x *= np.float32(std)
                q = quantize(x, t)
                if out is None:
                    out = np.empty((rows, q.shape[1]), np.uint8)
                out[r : r + len(q)] = q
            return out

        w.add_tensor(name, make, t, shape)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, lambda: np.ones(n, np.float32), GGMLType.F32, (n,))

    matrix("token_embd.weight", vocab, hidden, embd_type)
    for i in range(layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", hidden)
        matrix(b + "attn_q.weight", hidden, hidden, qtype)
        matrix(b + "attn_k.weight", kv_dim, hidden, qtype)
        matrix(b + "attn_v.weight", kv_dim, hidden, qtype)
        matrix(b + "attn_output.weight", hidden, hidden, qtype)
        norm(b + "ffn_norm.weight", hidden)
        if arch != "llama":
            norm(b + "attn_q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", head_dim)
        if experts:  # llama.cpp keeps the router in F32
            matrix(b + "ffn_gate_inp.weight", experts, hidden, GGMLType.F32)
            matrix(b + "ffn_gate_exps.weight", expert_ffn, hidden, qtype, experts)
            matrix(b + "ffn_up_exps.weight", expert_ffn, hidden, qtype, experts)
            matrix(b + "ffn_down_exps.weight", hidden, expert_ffn, qtype, experts)
            continue
        matrix(b + "ffn_gate.weight", ffn, hidden, qtype)
        matrix(b + "ffn_up.weight", ffn, hidden, qtype)
        matrix(b + "ffn_down.weight", hidden, ffn, qtype)
    norm("output_norm.weight", hidden)
    matrix("output.weight", vocab, hidden, output_type)
    return w


BERT_SHAPE = dict(hidden=384, layers=12, ffn=1536, heads=12, vocab=30522, ctx=512, type="F16")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_word(i: int) -> str:
    """The i-th made-up word of the BERT vocabulary (bijective base 26: a, b, ..., z, aa, ab, ...)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = string.ascii_lowercase[r] + s
    return s


def bert_vocab(n_vocab: int) -> list[str]:
    """The specials, then word starts ("▁" + word) with every fourth entry a continuation piece."""
    return BERT_SPECIALS + [("" if i % 4 == 0 else SPIECE) + bert_word(i) for i in range(n_vocab - len(BERT_SPECIALS))]


def build_bert_writer(path: str | Path, hidden: int, layers: int, ffn: int, heads: int, vocab: int, ctx: int,
                      qtype: GGMLType, seed: int = 0, std: float = 0.02) -> GGUFWriter:
    """A `bert` model as llama.cpp's converter writes a sentence-transformers one (mean pooling)."""
    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    w = GGUFWriter(path)
    U32, F32 = ValueType.UINT32, ValueType.FLOAT32
    for key, value, vtype in [("general.architecture", "bert", None), ("general.type", "model", None),
                              ("general.name", f"synthetic-bert-{hidden}x{layers}", None),
                              ("general.quantization_version", 2, U32),
                              ("general.file_type", FILE_TYPES.get(qtype, 1), U32),
                              ("bert.context_length", ctx, U32), ("bert.embedding_length", hidden, U32),
                              ("bert.feed_forward_length", ffn, U32), ("bert.block_count", layers, U32),
                              ("bert.attention.head_count", heads, U32),
                              ("bert.attention.layer_norm_epsilon", 1e-12, F32),
                              ("bert.attention.causal", False, ValueType.BOOL), ("bert.pooling_type", 1, U32),
                              ("tokenizer.ggml.token_type_count", 2, U32), ("tokenizer.ggml.model", "bert", None),
                              ("tokenizer.ggml.pre", "default", None)]:
        w.add(key, value, vtype)
    tokens = bert_vocab(vocab)
    w.add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
    w.add("tokenizer.ggml.token_type", [CONTROL] * len(BERT_SPECIALS) + [NORMAL] * (vocab - len(BERT_SPECIALS)),
          ValueType.ARRAY, ValueType.INT32)
    for key, i in (("padding", 0), ("unknown", 1), ("bos", 2), ("cls", 2), ("seperator", 3), ("eos", 3), ("mask", 4)):
        w.add(f"tokenizer.ggml.{key}_token_id", i, U32)
    index = itertools.count()

    def tensor(name: str, shape: tuple[int, ...], t: GGMLType = GGMLType.F32, fill: float | None = None) -> None:
        key = next(index)

        def make() -> np.ndarray:
            if fill is not None:
                return np.full(shape, fill, np.float32)
            x = np.random.default_rng([seed, key]).standard_normal(shape, dtype=np.float32) * np.float32(std)
            return x if t == GGMLType.F32 else quantize(x.reshape(-1, shape[-1]), t)

        w.add_tensor(name, make, t, shape)

    tensor("token_embd.weight", (vocab, hidden), qtype)
    tensor("token_types.weight", (2, hidden))
    tensor("position_embd.weight", (ctx, hidden))
    tensor("token_embd_norm.weight", (hidden,), fill=1.0)
    tensor("token_embd_norm.bias", (hidden,), fill=0.0)
    for i in range(layers):
        b = f"blk.{i}."
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", hidden, hidden), ("attn_v", hidden, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            tensor(b + name + ".weight", (rows, cols), qtype)
            tensor(b + name + ".bias", (rows,), fill=0.0)
        for name in ("attn_output_norm", "layer_output_norm"):
            tensor(b + name + ".weight", (hidden,), fill=1.0)
            tensor(b + name + ".bias", (hidden,), fill=0.0)
    return w


_VERIFY = r"""
import json, sys, time
import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as low
if sys.argv[2] == "off":  # no weight repacking / AMX buffers
    default = low.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = params
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, n_batch=64,
                      verbose=False, logits_all=True)
load_s = time.perf_counter() - t0
ids = llm.tokenize(b"Hello world", add_bos=True)
toks = ids[:int(sys.argv[3])]
t0 = time.perf_counter()
llm.eval(toks)
eval_s = time.perf_counter() - t0
logits = np.asarray(llm.scores[len(toks) - 1])
print(json.dumps({"ok": bool(np.isfinite(logits).all()), "llama_cpp": llama_cpp.__version__,
                  "load_s": round(load_s, 3), "n_vocab": llm.n_vocab(), "tokenize('Hello world')": ids,
                  "evaluated": toks, "eval_s": round(eval_s, 3), "logits_std": float(np.std(logits)),
                  "argmax": int(np.argmax(logits))}))
"""


LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_lora(model: str | Path, out: str | Path, rank: int = 16, targets: tuple[str, ...] = LORA_TARGETS,
               b_scale: float = 0.02, seed: int = 0) -> int:
    """A seeded random LoRA adapter for `model`: every layer's `targets` matrices get A (rank x in,
    N(0, 1/in)) and B (out x rank, N(0, b_scale^2)) in f16, alpha = 2 * rank (scale 2). Returns the
    count of adapted matrices."""
    from purelm.formats.gguf import GGUFFile

    f = GGUFFile(model)
    w = GGUFWriter(out)
    for key, value in (("general.type", "adapter"), ("general.architecture", f.architecture),
                       ("adapter.type", "lora"), ("adapter.lora.alpha", float(2 * rank))):
        w.add(key, value)
    rng = np.random.default_rng(seed)
    count = 0
    for name, t in f.tensors.items():
        if name.startswith("blk.") and name.split(".")[2] in targets and len(t.shape) == 2:
            n_out, n_in = t.shape
            w.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float16))
            w.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, rank)) * b_scale).astype(np.float16))
            count += 1
    w.write()
    f.close()
    return count


def verify_llama_cpp(path: str | Path, n_tokens: int = 4, python: str | None = None) -> dict:
    """Load the file with llama-cpp-python, tokenize a string and evaluate its first few tokens in one
    batch (in a child process: some llama.cpp builds crash; then it is retried without the extra weight
    buffers, i.e. without repacking / AMX)."""
    import subprocess

    python = python or sys.executable
    if subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        return {"ok": None, "skipped": f"llama_cpp is not importable by {python}"}
    notes = []
    for extra in ("on", "off"):
        r = subprocess.run([python, "-c", _VERIFY, str(path), extra, str(n_tokens)], capture_output=True, text=True)
        if r.returncode == 0:
            out = json.loads(r.stdout.strip().splitlines()[-1])
            out["extra_bufts"] = extra
            if notes:
                out["notes"] = notes
            return out
        notes.append(f"llama.cpp exited with code {r.returncode} with extra_bufts={extra}: {r.stderr[-300:].strip()}")
    return {"ok": False, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--type", default="Q4_0", help="type of the layer matrices: Q4_0 (default), f16, f32, q8_0, ...")
    ap.add_argument("--output-type", default="Q8_0",
                    help="type of output.weight (default Q8_0; llama.cpp's own Q4_0 files use Q6_K, which "
                         "purelm cannot quantize)")
    ap.add_argument("--embd-type", default=None, help="type of token_embd.weight (default: --type)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe", action="store_true", help="a Qwen3-MoE-shaped model (see above); the shape "
                    "options still apply, with these defaults")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--experts-used", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=384)
    ap.add_argument("--moe-dense-twin", action="store_true", help="the dense model that reads what one token "
                    "of --moe reads: a qwen3 (--moe's attention) with ffn = experts-used x expert-ffn")
    ap.add_argument("--bert", action="store_true", help="a BERT embedding model (see above); the shape options "
                    "still apply, with these defaults")
    ap.add_argument("--lora-for", metavar="MODEL", help="write a random LoRA adapter for MODEL instead of a model")
    ap.add_argument("--rank", type=int, default=16, help="--lora-for: the adapter's rank (default 16)")
    ap.add_argument("--no-verify", action="store_true", help="skip the llama-cpp-python load check")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    if args.lora_for:
        n = write_lora(args.lora_for, args.out, args.rank, seed=args.seed)
        print(json.dumps({"path": str(args.out), "bytes": Path(args.out).stat().st_size, "matrices": n,
                          "rank": args.rank}))
        return 0
    given = set(a.lstrip("-").replace("-", "_").split("=")[0] for a in (argv if argv is not None else sys.argv[1:])
                if a.startswith("--"))
    if args.bert:
        for k, v in BERT_SHAPE.items():
            if k not in given:
                setattr(args, k, v)
    if args.moe or args.moe_dense_twin:
        for k, v in MOE_SHAPE.items():
            if k not in given:
                setattr(args, k, v)
        if args.moe_dense_twin:
            args.ffn = args.experts_used * args.expert_ffn

    def qt(name: str) -> GGMLType:
        try:
            return GGMLType[name.upper()]
        except KeyError:
            ap.error(f"unknown type {name!r}")

    w = build_bert_writer(args.out, args.hidden, args.layers, args.ffn, args.heads, args.vocab, args.ctx,
                          qt(args.type), args.seed) if args.bert else build_writer(args.out, args.hidden, args.layers, args.ffn, args.heads, args.kv_heads, args.vocab,
                     args.ctx, qt(args.type), qt(args.output_type),
                     qt(args.embd_type) if args.embd_type else None, args.seed,
                     experts=args.experts if args.moe else 0, experts_used=args.experts_used,
                     expert_ffn=args.expert_ffn, qwen3=args.moe_dense_twin)
    n_params = sum(int(np.prod(t.shape)) for t in w.tensors)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if args.quiet or (now - last[0] < 0.5 and done < total):
            return
        last[0] = now
        print(f"\rwriting {args.out}: {done / 2**20:8.1f} / {total / 2**20:.1f} MiB "
              f"({100 * done / total:5.1f}%) {now - t0:6.1f} s", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    w.write(progress=progress)
    size = Path(args.out).stat().st_size
    report = {"path": str(args.out), "bytes": size, "params": n_params, "write_s": round(time.perf_counter() - t0, 2),
              "shape": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "heads", "kv_heads", "vocab", "ctx")},
              "type": args.type.upper(), "output_type": args.output_type.upper(), "seed": args.seed}
    if args.moe:
        report["experts"] = {"count": args.experts, "used": args.experts_used, "ffn": args.expert_ffn}
    if not args.no_verify and not args.bert:  # (embed_bench.py runs the BERT model in llama.cpp)
        report["llama_cpp_check"] = verify_llama_cpp(args.out)
    print(json.dumps(report, indent=2))
    check = report.get("llama_cpp_check", {})
    return 1 if check.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
