"""Hugging Face checkpoint (config.json + *.safetensors + tokenizer.json) to GGUF.

Tensor names, tensor transforms (the LLaMA q/k permutation, ...) and metadata keys follow llama.cpp's
convert_hf_to_gguf.py, so the files it writes run in llama.cpp and llama.cpp's files run here. Each
architecture's model file declares its `ConvertSpec`; this module is the engine. Tensors are read
lazily from the memory-mapped checkpoint and quantized one at a time while writing, so memory stays
near one tensor.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .convert_spec import ConvertSpec, Loader
from .errors import FormatError, PurelmError, UsageError
from .formats.gguf import GGUFWriter, ValueType
from .formats.safetensors import Checkpoint
from .quant import quantize
from .quant.types import BLOCK_INFO, GGMLType

OUT_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
             "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1, "q5_0": GGMLType.Q5_0, "q5_1": GGMLType.Q5_1}
# general.file_type (llama_ftype) of each output type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}

# token types as llama.cpp stores them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_JSON = 256 << 20  # tokenizer.json files are tens of MiB at most


def specs() -> dict[str, ConvertSpec]:
    from .models import CONVERTERS

    return CONVERTERS


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _read_json(path: Path, limit: int = MAX_JSON, want: type = dict) -> Any:
    """A JSON file of the checkpoint, or a FormatError naming it and the problem (line and column)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a fifo or device would block or never end
            raise FormatError(path, "file", "is not a regular file")
        if st.st_size > limit:
            raise FormatError(path, "file", f"is {st.st_size} bytes, over the {limit}-byte limit")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise FormatError(path, "file", f"cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FormatError(path, "file", f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(path, "JSON", f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting deeper than the stack
        raise FormatError(path, "JSON", _why(e)) from None
    if not isinstance(value, want):
        raise FormatError(path, "top level", f"is a JSON {_json_kind(value)}, expected an {_json_kind(want())}")
    return value


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _why(e: BaseException) -> str:
    """An exception from code fed bad input, as one line for an error message."""
    if isinstance(e, KeyError):
        return f"missing key {_short(e.args[0]) if e.args else '?'}"
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _sentencepiece_kv(path: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """A SentencePiece tokenizer.model as llama.cpp's converter writes it (tokenizer.ggml.model "llama")."""
    from .formats.spm_model import read_sentencepiece

    sp = read_sentencepiece(path)
    tokens, scores, types = list(sp.pieces), list(sp.scores), list(sp.types)
    for i in range(len(tokens), vocab_size):  # the model's embedding may have more rows than pieces
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": sp.add_dummy_prefix}
    return kv, {t: i for i, t in enumerate(tokens)}


def _xlm_roberta_kv(path: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """XLM-RoBERTa's sentencepiece.bpe.model as llama.cpp's converter writes it: tokenizer model "t5"
    (unigram with the model's normalizer), the pieces moved one id up behind fairseq's <s>, <pad>,
    </s>, <unk> (as Hugging Face numbers them), the last id dropped."""
    from .formats.spm_model import read_sentencepiece

    sp = read_sentencepiece(path)
    size = max(vocab_size, len(sp.pieces))
    tokens, scores = [f"[PAD{i}]" for i in range(size)], [-10000.0] * size
    types = [UNUSED] * size
    for i, (piece, score, kind) in enumerate(zip(sp.pieces, sp.scores, sp.types)):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL  # (user-defined: normal)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + tokens[3:-1]
    scores = [0.0] * 4 + scores[3:-1]
    types = [CONTROL] * 3 + [UNKNOWN] + types[3:-1]
    kv: dict[str, Any] = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default",
                          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                          "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": sp.add_dummy_prefix,
                          "tokenizer.ggml.remove_extra_whitespaces": sp.remove_extra_whitespaces}
    if sp.charsmap:
        kv["tokenizer.ggml.precompiled_charsmap"] = np.frombuffer(sp.charsmap, np.uint8)
    return kv, {t: i for i, t in enumerate(tokens)}


def _tokenizer_kv(directory: Path, cfg: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    spm_path = directory / "tokenizer.model"
    architectures = cfg.get("architectures")
    xlm = isinstance(architectures, list) and any(str(a).startswith("XLMRoberta") for a in architectures)
    if xlm and (directory / "sentencepiece.bpe.model").exists():
        kv, vocab = _xlm_roberta_kv(directory / "sentencepiece.bpe.model", vocab_size)
        tj = _read_json(path) if path.exists() else {}
        # "<s> $A </s>", from the tokenizer.json's post-processor where there is one
        kv.update({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True, **_encoder_flags(tj)})
        for t in tj.get("added_tokens") or []:  # <mask>: the last id, which the token list drops
            if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
                vocab.setdefault(t["content"], t["id"])
        return {**kv, **_special_tokens_kv(directory, cfg, vocab, len(kv["tokenizer.ggml.tokens"]))}
    tj = _read_json(path) if path.exists() else {}
    model = tj.get("model", {})
    if not isinstance(model, dict):
        raise FormatError(path, "model", f"is a JSON {_json_kind(model)}, expected an object")
    byte_level = model.get("type") == "BPE" and isinstance(model.get("vocab"), dict) and not model.get("byte_fallback")
    wordpiece = model.get("type") == "WordPiece" and isinstance(model.get("vocab"), dict)
    if spm_path.exists() and not (byte_level or wordpiece):
        kv, vocab = _sentencepiece_kv(spm_path, vocab_size)
    elif path.exists():
        if not (byte_level or wordpiece):
            raise PurelmError(f"{path}: only byte-level BPE and WordPiece tokenizer.json files (or a "
                              "SentencePiece tokenizer.model) are converted so far")
        if wordpiece:
            kv, vocab = _wordpiece_kv(path, tj, vocab_size)
        else:
            kv, vocab = _byte_level_kv(path, tj, vocab_size)
            kv["tokenizer.ggml.pre"] = _pre_name(path, tj, kv)
            if isinstance(tj.get("post_processor"), dict) and tj["post_processor"].get("type") == "RobertaProcessing":
                kv.update(_encoder_flags(tj))
    else:
        return {}
    return {**kv, **_special_tokens_kv(directory, cfg, vocab, len(kv["tokenizer.ggml.tokens"]))}


def _vocabulary(path: Path, tj: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """A tokenizer.json's tokens and llama.cpp token types by id (added tokens: control when special,
    else user-defined; ids no token has: "[PAD<id>]", unused), and its text -> id map."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added_list = tj.get("added_tokens") or []
    if not isinstance(added_list, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) for t in added_list):
        raise FormatError(path, "added_tokens", "must be a list of objects with a string \"content\"")
    added = {t["content"]: t for t in added_list}
    for text, t in added.items():
        vocab[text] = t.get("id")
    # Ids index the token list: each must be an integer below the vocabulary's size, or a hostile id
    # (10**12) would allocate a list that large.
    size = max(vocab_size, len(model["vocab"]) + len(added))
    for text, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
            where = "added_tokens" if text in added else "model.vocab"
            raise FormatError(path, f"{where}[{_short(text)}]", f"id {_short(i)} is not an integer in [0, {size})")
    size = max(vocab_size, max(vocab.values(), default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for text, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    return tokens, types, vocab


def _byte_level_kv(path: Path, tj: dict[str, Any], vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    tokens, types, vocab = _vocabulary(path, tj, vocab_size)
    merges = tj["model"].get("merges") or []
    if not isinstance(merges, list) or not all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))
            for m in merges):
        raise FormatError(path, "model.merges", "must be a list of \"a b\" strings or [a, b] pairs of strings")
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
    }
    return kv, vocab


def _wordpiece_kv(path: Path, tj: dict[str, Any], vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """A WordPiece tokenizer.json (BERT) as llama.cpp's converter writes it: tokenizer model "bert", each
    piece but the control tokens stored with "##" taken off a continuation and "\u2581" put in front of
    a word start (purelm.wordpiece); lowercasing as the file's BertNormalizer says."""
    tokens, types, vocab = _vocabulary(path, tj, vocab_size)
    prefix = tj["model"].get("continuing_subword_prefix", "##")
    if not isinstance(prefix, str) or not prefix:
        raise FormatError(path, "model.continuing_subword_prefix",
                          f"is {_short(prefix)}; it must be a non-empty string")
    tokens = [t if kind == CONTROL else t[len(prefix):] if t.startswith(prefix) else "\u2581" + t
              for t, kind in zip(tokens, types)]
    kv: dict[str, Any] = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.pre": "default",
                          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    kv.update(_encoder_flags(tj))
    norm = tj.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "BertNormalizer":  # (strip_accents null: as lowercase)
        for key in ("lowercase", "strip_accents"):
            if isinstance(norm.get(key), bool):
                kv[f"tokenizer.ggml.normalizer.{key}"] = norm[key]
    return kv, vocab


def _encoder_flags(tj: dict[str, Any]) -> dict[str, Any]:
    """add_bos/add_eos/add_sep as gguf's SpecialVocab reads an encoder's post-processor: BERT's
    "[CLS] $A [SEP]" adds BOS and EOS ("$A [SEP] $B [SEP]": that [SEP] is the EOS, no separator is
    added), RoBERTa's processor all three ("<s> A </s></s> B </s>")."""
    post = tj.get("post_processor")
    if not isinstance(post, dict):
        return {}
    if post.get("type") == "RobertaProcessing":
        return {f"tokenizer.ggml.add_{k}_token": True for k in ("bos", "eos", "sep")}
    single = post.get("single")
    if post.get("type") != "TemplateProcessing" or not isinstance(single, list) or len(single) < 2 \
            or not all(isinstance(x, dict) for x in single):
        return {}
    kv = {"tokenizer.ggml.add_bos_token": "SpecialToken" in single[0],
          "tokenizer.ggml.add_eos_token": "SpecialToken" in single[-1]}
    pair = post.get("pair")
    if isinstance(pair, list) and all(isinstance(x, dict) for x in pair):
        # between $A and $B: the EOS that ends A, then a separator where there are two tokens
        # ("<s> $A </s> </s> $B </s>": XLM-RoBERTa's)
        a = next((i for i, x in enumerate(pair) if "Sequence" in x), None)
        b = next((i for i, x in enumerate(pair) if "Sequence" in x and i != a), None)
        middle = pair[a + 1:b] if a is not None and b is not None else []
        kv["tokenizer.ggml.add_sep_token"] = len(middle) == 2 and all("SpecialToken" in x for x in middle)
    return kv


# The pre-tokenizers tried on a tokenizer.json that is not GPT-2's own (llama.cpp's converter names them by
# the ids its tokenizer gives a test text; so does this, against the pre names purelm knows)
PRE_CANDIDATES = ("llama-bpe", "qwen2", "smollm", "gpt-2", "deepseek-llm", "deepseek-coder", "falcon", "starcoder",
                  "refact", "command-r", "olmo", "mpt", "bloom", "chatglm-bpe", "tekken", "default")
PRE_PROBE = ("Hello World! 3 33 333 3333 33333 333333 1.5 ÷ 10,000 \n \n\n  \t\t   x  #!/bin/sh  'll 'VE 's "
             "I'm ``quoted'' ...!!! ?!? ~~ (a) [b] {c} <d> $5+3=8 @x #y %z ^ & * _ | \\ / ` été Straße "
             "日本語のテキスト 한국어 русский ελληνικά עברית العربية हिन्दी 🦙🚀 👍🏽 \u3000 \u00a0end ")


def _pre_name(path: Path, tj: dict[str, Any], kv: dict[str, Any]) -> str:
    """tokenizer.ggml.pre for a byte-level tokenizer.json: "gpt-2" for GPT-2's own pre-tokenizer, else
    the first of PRE_CANDIDATES whose split gives the tokenizer's own ids for PRE_PROBE (transformers'
    `tokenizers` runs the file); "default" (llama.cpp's fallback split) where none does."""
    pre = tj.get("pre_tokenizer")
    gpt2 = isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if gpt2 and not tj.get("normalizer"):
        return "gpt-2"
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    try:
        want = HFTokenizer.from_file(str(path)).encode(PRE_PROBE, add_special_tokens=False).ids
    except Exception as e:  # a file transformers' library cannot run: no way to tell
        print(f"purelm: warning: {path}: its pre-tokenizer could not be run ({e}); writing \"default\"",
              file=sys.stderr)
        return "default"
    meta = {**kv, "tokenizer.ggml.add_bos_token": False}
    for name in PRE_CANDIDATES:
        try:
            got = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": name}).encode(
                PRE_PROBE, add_special=False, parse_special=False)
        except PurelmError:
            continue
        if got == want:
            return name
    print(f"purelm: warning: {path}: no known pre-tokenizer splits text as this tokenizer.json does; writing "
          "\"default\" (llama.cpp's fallback: its tokens may differ)", file=sys.stderr)
    return "default"


def _special_tokens_kv(directory: Path, cfg: dict[str, Any], vocab: dict[str, int], n_tokens: int) -> dict[str, Any]:
    kv: dict[str, Any] = {}
    tcfg_path = directory / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.exists() else {}

    def token_id(key: str) -> int | None:
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok in vocab:
            return vocab[tok]
        cid = cfg.get(f"{key}_id")
        # out-of-range ids are dropped, not refused: old LLaMA configs say pad_token_id -1
        return cid if isinstance(cid, int) and not isinstance(cid, bool) and 0 <= cid < n_tokens else None

    for key, gkey in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"),
                      ("sep_token", "seperator_token_id"),  # (llama.cpp's spelling)
                      ("mask_token", "mask_token_id")):
        tid = token_id(key)
        if tid is not None:
            kv[f"tokenizer.ggml.{gkey}"] = tid
    # as gguf's SpecialVocab: a tokenizer with [CLS] and [SEP] but no BOS or EOS uses them as such
    for gkey, alt in (("bos_token_id", token_id("cls_token")), ("eos_token_id", token_id("sep_token"))):
        if f"tokenizer.ggml.{gkey}" not in kv and alt is not None:
            kv[f"tokenizer.ggml.{gkey}"] = alt
    if "add_bos_token" in tcfg:
        kv["tokenizer.ggml.add_bos_token"] = bool(tcfg["add_bos_token"])
    if isinstance(tcfg.get("chat_template"), str):
        kv["tokenizer.chat_template"] = tcfg["chat_template"]
    return kv


def out_type(name: str, shape: tuple[int, ...], target: GGMLType) -> GGMLType:
    """llama.cpp's choice: 1-D tensors (biases), norm weights (even 2-D per-head ones), MoE routers
    (ffn_gate_inp: a rounded router picks other experts) and position and token-type embeddings stay
    F32; a row that does not split into the target's blocks falls back to F16."""
    if len(shape) < 2 or target == GGMLType.F32 or name.endswith(
            ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")):
        return GGMLType.F32
    if shape[-1] % BLOCK_INFO[target][0]:
        return GGMLType.F16
    return target


def _progress_bar(total_desc: str) -> Callable[[int, int], None] | None:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=total_desc,
                       file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


# Hyperparameters the converters read, checked before any of them runs: a config is untrusted input, and
# a count that drives a loop or an allocation must be bounded by what the checkpoint actually holds.
# key -> (smallest allowed, what bounds it from above)
INT_KEYS: dict[str, tuple[int, str]] = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers"), (1, "tensors")),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads", "n_head_kv",
                     "hidden_size", "n_embd", "n_embed", "d_model", "intermediate_size", "n_inner", "ffn_hidden_size",
                     "head_dim", "rotary_dim", "vocab_size", "kv_n_heads"), (1, "dim")),
    **dict.fromkeys(("max_position_embeddings", "original_max_position_embeddings", "n_positions", "n_ctx",
                     "max_seq_len", "seq_length"), (1, "context")),
    "sliding_window": (0, "context"),
    # mixtures of experts: the experts' matrices are stacked (or stored) along a dimension of that size
    **dict.fromkeys(("num_experts", "num_local_experts", "num_experts_per_tok"), (1, "dim")),
    "decoder_sparse_step": (1, "tensors"),
    "type_vocab_size": (1, "dim"),  # BERT's token types: rows of token_types
    "max_trained_positions": (1, "context"),  # nomic-bert
}
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_n_heads")
MAX_CONTEXT = (1 << 31) - 1  # GGUF keeps context lengths as 32-bit integers
# Real numbers: "positive" ones must be > 0, "fraction" ones in (0, 1], all finite float32 values.
FLOAT_KEYS: dict[str, str] = {
    **dict.fromkeys(("rope_theta", "rotary_emb_base", "rope_local_base_freq", "rms_norm_eps", "layer_norm_eps",
                     "layer_norm_epsilon", "norm_eps", "factor", "expansion_ratio", "query_pre_attn_scalar"),
                    "positive"),
    **dict.fromkeys(("partial_rotary_factor", "rotary_pct", "rope_pct"), "fraction"),
    **dict.fromkeys(("attention_factor", "attn_logit_softcapping", "final_logit_softcapping", "clip_qkv",
                     "alibi_bias_max"), "finite"),
}
NESTED = ("rope_scaling", "rope_parameters", "attn_config")  # objects whose numbers are checked too

# Exceptions that code fed a malformed config or checkpoint raises; each becomes a FormatError.
BAD_INPUT = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
             struct.error)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_config(path: Path, cfg: dict[str, Any], ckpt: Checkpoint, n_layer_key: str) -> None:
    def fail(key: str, problem: str) -> FormatError:
        return FormatError(path, key, problem)

    if cfg.get(n_layer_key) is None:
        raise fail(n_layer_key, "is missing: the number of layers is needed")
    n_tensors, largest = len(ckpt.names()), ckpt.largest_dim()

    def check_ints(d: dict[str, Any], prefix: str) -> None:
        for key, (low, bound) in INT_KEYS.items():
            v, name = d.get(key), prefix + key
            if v is None:  # absent or null: the converter uses its default
                continue
            if not _is_int(v):
                raise fail(name, f"must be an integer, got {_short(v)}")
            if v < low:
                raise fail(name, f"{v} is less than {low}")
            if bound == "tensors" and v > n_tensors:
                raise fail(name, f"{v} layers, but the checkpoint holds only {n_tensors} tensors")
            if bound == "dim" and v > largest:
                raise fail(name, f"{v} is larger than any tensor dimension in the checkpoint (largest: {largest})")
            if bound == "context" and v > MAX_CONTEXT:
                raise fail(name, f"{v} is over the limit of {MAX_CONTEXT}")
        n_head = next((cfg[k] for k in HEAD_KEYS if cfg.get(k) is not None), None)
        for key in KV_HEAD_KEYS:
            if n_head is not None and d.get(key) is not None and d[key] > n_head:
                raise fail(prefix + key, f"{d[key]} key/value heads is more than the {n_head} attention heads")
        n_expert = d.get("num_experts") or d.get("num_local_experts")
        if n_expert is not None and d.get("num_experts_per_tok") is not None and d["num_experts_per_tok"] > n_expert:
            raise fail(prefix + "num_experts_per_tok",
                       f"{d['num_experts_per_tok']} experts per token is more than the {n_expert} experts")

    def check_numbers(d: dict[str, Any], prefix: str) -> None:
        for key, kind in FLOAT_KEYS.items():
            v = d.get(key)
            if v is None:
                continue
            name = prefix + key
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise fail(name, f"must be a number, got {_short(v)}")
            if not (math.isfinite(v) if isinstance(v, float) else True) or abs(v) > FLOAT32_MAX:
                raise fail(name, f"{_short(v)} is not a finite float32 number")
            if kind == "positive" and v <= 0:
                raise fail(name, f"must be positive, got {v}")
            if kind == "fraction" and not 0 < v <= 1:
                raise fail(name, f"must be in (0, 1], got {v}")

    check_ints(cfg, "")
    check_numbers(cfg, "")
    for outer in NESTED:
        d = cfg.get(outer)
        if d is None:
            continue
        if not isinstance(d, dict):
            raise fail(outer, f"is a JSON {_json_kind(d)}, expected an object")
        for prefix, sub in [(f"{outer}.", d)] + [(f"{outer}.{k}.", v) for k, v in d.items() if isinstance(v, dict)]:
            check_ints(sub, prefix)  # (the inner ones: Gemma's rope_parameters per layer type)
            check_numbers(sub, prefix)
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != cfg[n_layer_key]
                              or not all(isinstance(t, str) for t in types)):
        raise fail("layer_types", f"must be a list of {cfg[n_layer_key]} strings ({n_layer_key})")


def _check_output(out_path: Path) -> None:
    if out_path.is_dir():
        raise UsageError(f"{out_path}: is a folder; give the path of the .gguf file to write")
    folder = out_path.parent
    if not folder.is_dir():
        raise UsageError(f"{folder}: the output folder does not exist")


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, out_type_name: str = "f16",
            progress: Callable[[int, int], None] | None = None, split_max_size: int | None = None) -> Path:
    """Convert a Hugging Face model directory to GGUF; returns the output path (a split model's first
    shard).

    The file is written under a temporary name in the output folder and renamed only once it has been
    opened as a model, so an error or interrupt leaves no partial output behind. `split_max_size`:
    write shards of at most that many tensor bytes (formats/split.py), from the checked file."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type_name not in OUT_TYPES:
        raise UsageError(f"unknown output type {out_type_name!r} (choose from {', '.join(OUT_TYPES)})")
    _check_output(out_path)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise PurelmError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    cfg = _read_json(cfg_path, 16 << 20)
    archs = cfg.get("architectures")
    if archs is None:
        raise FormatError(cfg_path, "architectures", "is missing: cannot tell which model this is")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise FormatError(cfg_path, "architectures", f"must be a list of class names, got {_short(archs)}")
    arch = archs[0]
    spec = specs().get(arch)
    if spec is None:
        raise PurelmError(f"{cfg_path}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(sorted(specs()))})")
    ckpt = Checkpoint(hf_dir)
    _check_config(cfg_path, cfg, ckpt, spec.n_layer_key)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    try:
        try:
            written = _write(hf_dir, cfg_path, cfg, arch, spec, ckpt, tmp, out_type_name, progress,
                             f"writing {out_path.name}")
            _check_model(hf_dir, tmp, written)
        except BAD_INPUT as e:  # the last net: whatever slipped past the checks above
            raise FormatError(hf_dir, "checkpoint", f"cannot be converted ({_why(e)})") from None
        except OSError as e:
            raise PurelmError(f"{out_path}: cannot be written: {e.strerror or e}") from None
        try:
            if split_max_size is not None:  # the checked file, cut into shards (renamed in once all are written)
                from .formats.split import rewrite

                out_path = Path(rewrite(tmp, out_path, split_max_size)[0])
                tmp.unlink()
            else:
                os.replace(tmp, out_path)
        except OSError as e:
            raise PurelmError(f"{out_path}: cannot be written: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _write(hf_dir: Path, cfg_path: Path, cfg: dict[str, Any], arch: str, spec: ConvertSpec, ckpt: Checkpoint,
           path: Path, out_type_name: str, progress: Callable[[int, int], None] | None,
           desc: str) -> dict[str, str]:
    """Write the GGUF file; returns GGUF tensor name -> HF tensor name (for error messages)."""
    n_layer = cfg[spec.n_layer_key]
    target = OUT_TYPES[out_type_name]

    w = GGUFWriter(path)
    w.add("general.architecture", spec.gguf_arch)
    name_or_path = cfg.get("_name_or_path")
    w.add("general.name", name_or_path if isinstance(name_or_path, str) and name_or_path else hf_dir.name)
    try:
        for key, value in spec.hparams(cfg).items():
            w.add(f"{spec.gguf_arch}.{key}", value)
    except KeyError as e:
        raise FormatError(cfg_path, str(e.args[0]) if e.args else "?", f"is missing (needed for {arch})") from None
    except BAD_INPUT as e:
        raise FormatError(cfg_path, "hyperparameters", f"do not make a {arch} model ({_why(e)})") from None
    if spec.extra_kv:
        try:
            extra = spec.extra_kv(hf_dir, cfg)
        except BAD_INPUT as e:
            raise FormatError(hf_dir, "metadata", f"for {arch}: {_why(e)}") from None
        for key, value in extra.items():
            w.add(key, value)
    w.add("general.file_type", FILE_TYPES[out_type_name])
    w.add("general.quantization_version", 2)
    vocab_size = cfg.get("vocab_size") or 0
    for key, value in _tokenizer_kv(hf_dir, cfg, vocab_size).items():
        elem = {"tokenizer.ggml.token_type": ValueType.INT32, "tokenizer.ggml.scores": ValueType.FLOAT32}.get(key)
        w.add(key, value, elem=elem)

    seen: set[str] = set()
    written: dict[str, str] = {}  # GGUF name -> HF name (for error messages)

    def add(name: str, shape: tuple[int, ...], load: Loader, source: str) -> None:
        def packed() -> np.ndarray:
            try:
                return quantize(load(), qtype)
            except BAD_INPUT as e:  # a reshape that the config's sizes do not allow, an odd dtype, ...
                raise FormatError(hf_dir, f"tensor {source!r}", f"shape {shape} does not fit the config "
                                  f"({_why(e)})") from None

        try:
            qtype = out_type(name, shape, target)
            w.add_tensor(name, packed, qtype, shape)
        except BAD_INPUT as e:
            raise FormatError(hf_dir, f"tensor {source!r}", f"cannot be stored as {name!r} ({_why(e)})") from None
        written[name] = source

    for hf_pat, gguf_pat in spec.tensors:
        for i in range(n_layer) if "{i}" in hf_pat else [None]:
            hf_name, name = hf_pat.format(i=i), gguf_pat.format(i=i)
            if hf_name not in ckpt:
                continue
            seen.add(hf_name)
            if name == "output.weight" and cfg.get("tie_word_embeddings", False):
                continue

            def load(hf_name: str = hf_name, name: str = name) -> np.ndarray:
                x = ckpt.get(hf_name)
                return spec.transform(name, x, cfg) if spec.transform else x

            add(name, ckpt.shape(hf_name), load, hf_name)
    if spec.extra_tensors:
        try:
            extra = list(spec.extra_tensors(ckpt, cfg))
        except (*BAD_INPUT, RuntimeError) as e:  # RuntimeError: a StopIteration inside the generator
            raise FormatError(hf_dir, f"tensors for {arch}", f"do not match the config ({_why(e)})") from None
        for name, shape, load in extra:
            add(name, shape, load, name)

    for name in spec.required:
        if name not in written:
            raise FormatError(hf_dir, f"tensor for {name!r}", "is missing from the checkpoint")
    unused = [n for n in ckpt.names() if n not in seen and not spec.ignored(n)
              and not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise PurelmError(f"{hf_dir}: tensors with no GGUF name for {arch}: {', '.join(map(repr, unused[:5]))}")
    try:
        w.write(progress if progress is not None else _progress_bar(desc))
    except ValueError as e:  # a loader that gave another size than its declared shape
        raise FormatError(hf_dir, "tensor data", _why(e)) from None
    return written


def _check_model(hf_dir: Path, path: Path, written: dict[str, str]) -> None:
    """Open the written file as a model: the model checks every tensor's presence and shape. On failure
    the error names the checkpoint's tensor."""
    from .backends.numpy_backend import NumpyBackend
    from .formats.gguf import GGUFFile
    from .models import build_model

    try:
        with GGUFFile(path) as f:
            build_model(f, NumpyBackend())
    except FormatError as e:
        name = e.field.removeprefix("tensor ").strip("'")
        source = written.get(name)
        where = f" (from {source!r})" if source and source != name else ""
        raise FormatError(hf_dir, f"tensor {name!r}{where}" if e.field.startswith("tensor ") else e.field,
                          e.problem) from None
    except BAD_INPUT as e:
        raise FormatError(hf_dir, "converted model", f"does not load ({_why(e)})") from None
