"""A tokenizer built from a GGUF file's metadata, on top of Hugging Face `tokenizers`.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, the merges, the token types and
the special token ids as metadata under llama.cpp's key names. From those we build the same
`tokenizers.Tokenizer` that transformers builds for `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`, so ids match it, and take from llama.cpp what transformers does not decide: the
pre-tokenizer regex for each `tokenizer.ggml.pre`, and which tokens end generation.

Five vocabulary kinds are supported (`tokenizer.ggml.model`), every one llama.cpp's tokenizer test
suite covers (tests/test_llama_cpp_vocabs.py runs it):
  gpt2    byte-level BPE with merges; the text split is chosen by `tokenizer.ggml.pre`
  llama   SentencePiece-style BPE ranked by scores, with `<0xNN>` byte fallback and "▁" for spaces
  gemma4  BPE with merges over raw UTF-8 ("▁" for spaces, cut only at newlines, `<0xNN>` fallback)
  bert    WordPiece, as llama.cpp runs it (purelm.wordpiece): embedding models
  t5      SentencePiece unigram with its precompiled normalizer (purelm.unigram): T5, XLM-R

The `tokenizers` object (or the WordPiece / unigram tables) is built on first use, so opening a model
stays fast. "bert" and "t5" follow llama.cpp's tokenizers exactly, not transformers'.

Where this follows llama.cpp rather than transformers' GGUF loader (ids can differ):
  - pre "smollm", "starcoder", "refact", "command-r", ... split digits off first, as llama.cpp and
    those models' own tokenizer.json do; transformers skips that step, which shows on a run of
    spaces before a digit ("x  1").
  - pre "llama3"/"llama-bpe"/"tekken"...: a word that is itself in the vocabulary is taken whole
    (`ignore_merges`, as llama.cpp and Llama 3's tokenizer.json do).
  - pre names transformers does not know (falcon, deepseek-*, bloom, ...) get llama.cpp's splits;
    transformers gives them the GPT-2 split, which is also what unknown names get here.
  - pre "default" (and a "gpt2" vocabulary without a pre name) cuts punctuation runs off first, as
    llama.cpp's default pre-tokenizer does; transformers gives them the GPT-2 split ("x  #" differs).
  - a "llama" vocabulary puts "▁" before every run of text, also one that already starts with a space
    and text after a special token, as sentencepiece and llama.cpp do (transformers skips it there);
    `tokenizer.ggml.add_space_prefix = false` turns the prefix off.
  - without a `tokenizer.ggml.add_bos_token` key, a llama3-style "gpt2" vocabulary adds BOS.
  - a user-defined token stored as plain text in a "gpt2" vocabulary (MPT's runs of spaces) is matched
    whole in the text, and its byte-alphabet spelling ("ĠĠ") stays the ordinary token it is.

The metadata is untrusted: a value of the wrong type or shape is a FormatError naming its key.
As in llama.cpp, a special-token id outside the vocabulary is ignored, empty tokens are allowed and
duplicate tokens are an error.
"""

from __future__ import annotations

import codecs
import operator
import os
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from purelm.errors import FormatError, PurelmError, UsageError
from purelm.unigram import Unigram
from purelm.wordpiece import WordPiece, detokenize

# Token types as llama.cpp's converters write them into `tokenizer.ggml.token_type`.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SUPPORTED_MODELS = ("gpt2", "llama", "gemma4", "bert", "t5")
_TOKEN_TYPE_MAX = 6  # llama.cpp's types run from 0 (undefined) to 6 (byte)

# Longest token that gets merges from scores. Finding a token's splits hashes both halves at every
# cut, which is quadratic in its length: one hostile token of a megabyte took minutes. SentencePiece
# pieces are at most 16 characters by default, and real vocabularies stay far below this.
MAX_MERGE_TOKEN_LEN = 256

_SURROGATES = re.compile("[\ud800-\udfff]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte gets a printable character, so BPE runs on text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


_CHAR_OF_BYTE = _bytes_to_unicode()
_BYTE_OF_CHAR = {char: byte for byte, char in _CHAR_OF_BYTE.items()}
_BYTE_ALPHABET = frozenset(_BYTE_OF_CHAR)

# --- Pre-tokenizer splits, by `tokenizer.ggml.pre` -------------------------------------------------
# Each entry is a list of regexes applied one after the other, each cutting every piece into its
# matches and the text between them (llama.cpp's `regex_exprs`, `tokenizers`' "isolated" Split).
# Where transformers has a regex for a name, it is the original from the model's tokenizer.json,
# which `tokenizers` runs as written; llama.cpp rewrites some of them for its own regex engine.
# GPT2_SPLIT is what `ByteLevel(use_regex=True)` does on its own.

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SEED_CODER_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BAILINGMOE_SPLIT = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
CJK_HANGUL = r"[一-龥ࠀ-一가-퟿]+"
# Cased letters, as in DeepSeek-LLM's tokenizer.json. Escapes mark the letters that Unicode
# normalization (NFC) would silently turn into others (OHM SIGN into OMEGA, KELVIN SIGN into K...).
DEEPSEEK_LLM_LETTERS = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅ"
    "ὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
DEEPSEEK3_MAIN = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `None` means ByteLevel's own GPT-2 regex, which is also what an unknown name gets.
_SPLITS: dict[str, list[str] | None] = {}


def _register(names: Iterable[str], splits: list[str] | None) -> None:
    for name in names:
        _SPLITS[name] = splits


# llama.cpp's "default" (also a BPE vocabulary without a pre-tokenizer name): punctuation runs cut off
# first, then GPT-2's split without its last alternative, then digit runs, then runs of three digits
_register(
    ["default"],
    [r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)", r"\p{N}+",
     r"[0-9][0-9][0-9]"],
)
_register(
    ["gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
     "a.x-4.0", "mellum", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion",
     "granite-docling", "exaone4"],
    None,
)
# llama.cpp splits digits one by one first for these (their tokenizer.json has a Digits step).
_register(
    ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
    [r"\p{N}", GPT2_SPLIT],
)
_register(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"],
    [LLAMA3_SPLIT],
)
_register(
    ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "grok-2"],
    [QWEN2_SPLIT],
)
_register(["qwen35"], [QWEN35_SPLIT])
_register(["tekken"], [TEKKEN_SPLIT])
_register(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], [GPT4O_SPLIT])
_register(["seed-coder"], [SEED_CODER_SPLIT])
_register(["bailingmoe", "bailingmoe2", "llada-moe"], [BAILINGMOE_SPLIT])
_register(["falcon"], [r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"])
_register(["bloom", "poro-chat", "gpt3-finnish"], [BLOOM_SPLIT])
_register(["viking"], [BLOOM_SPLIT, r"\p{N}"])
_register(
    ["deepseek-llm"],
    [r"[\r\n]", DEEPSEEK_LLM_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", CJK_HANGUL, r"\p{N}+"],
)
_register(["deepseek-coder"], [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}"])
_register(["deepseek-v3", "hunyuan-dense"], [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_MAIN])
_register(
    ["chameleon"],
    [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
     r"[\p{P}!-/:-@\[-`{-~]", GPT2_SPLIT],
)

# llama.cpp takes the whole word as one token when it is in the vocabulary, before any merge.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}
# llama.cpp adds BOS for these when the file does not say.
_BPE_ADD_BOS_DEFAULT = _IGNORE_MERGES | {"chameleon"}

# --- Which tokens end generation (llama.cpp's text lists) --------------------------------------------
_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>"]
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"}
# Fill-in-the-middle tokens (llama.cpp's spellings, its order), for `/infill` and a completion's `suffix`
_FIM_PRE_TEXTS = ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                  "<|code_prefix|>", "<|prefix|>"]
_FIM_SUF_TEXTS = ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                  "<|code_suffix|>", "<|suffix|>"]
_FIM_MID_TEXTS = ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                  "<|code_middle|>", "<|middle|>"]
_FIM_PAD_TEXTS = ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"]
_FIM_REP_TEXTS = ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"]
_FIM_SEP_TEXTS = ["<|file_sep|>"]

# Special tokens the transformers tokenizer classes declare by default; marked special when present.
_DEFAULT_SPECIALS = {
    "gpt2": ("<|endoftext|>",),
    "llama": ("<unk>", "<s>", "</s>"),
    "gemma": ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>"),
    "bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "t5": ("<unk>", "<s>", "</s>", "<pad>"),
}
# llama.cpp's ids for vocabularies whose file names none (checked against the size).
_DEFAULT_IDS = {"bert": {"bos": 101, "unknown": 100, "seperator": 102, "padding": 0},
                "t5": {"eos": 1, "unknown": 2, "padding": 0}}
# Tokenized by purelm.wordpiece / purelm.unigram rather than by `tokenizers`.
_OWN_ENGINES = ("bert", "t5")
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


def _lookup(meta: Any, key: str) -> Any:
    """`meta[key]`, or None; `meta` may be a mapping, a lazy mapping or a callable."""
    if hasattr(meta, "get"):
        return meta.get(key)
    if callable(meta):
        return meta(key)
    try:
        return meta[key]
    except (KeyError, IndexError):
        return None


class _Reader:
    """Typed reads of untrusted metadata: a value of the wrong type is a FormatError naming its key."""

    def __init__(self, meta: Any, path: str) -> None:
        self.meta, self.path = meta, path

    def fail(self, key: str, problem: str) -> FormatError:
        return FormatError(self.path, key, problem)

    def get(self, key: str) -> Any:
        return _lookup(self.meta, key)

    def string(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, (bool, np.bool_)):
            raise self.fail(key, f"expected a bool, got {type(value).__name__}")
        return bool(value)

    def array(self, key: str) -> list | None:
        """A GGUF array value (list, tuple or 1-D numpy array) as a plain Python list."""
        value = self.get(key)
        if value is None or isinstance(value, (list, tuple)):
            return None if value is None else list(value)
        if isinstance(value, np.ndarray) and value.ndim == 1:
            return value.tolist()
        raise self.fail(key, f"expected an array, got {type(value).__name__}")

    def numbers(self, key: str, count: int, integer: bool) -> list | None:
        """An array of one number per token; NaN is not a number here."""
        value = self.get(key)
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in ("iu" if integer else "iuf"):
            if len(value) == count and not (value.dtype.kind == "f" and np.isnan(value).any()):
                return value.tolist()  # what files hold, checked at numpy speed; else the errors below
        values = self.array(key)
        if values is None:
            return None
        if len(values) != count:
            raise self.fail(key, f"{len(values)} entries for {count} tokens")
        kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, kinds) or value != value:
                raise self.fail(key, f"entry {index} is {value!r}, not {'an integer' if integer else 'a number'}")
        return values

    def token_id(self, key: str, count: int) -> int | None:
        # An id outside the vocabulary is ignored, as llama.cpp does (files carry pad = 2**32 - 1).
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self.fail(key, f"expected an integer token id, got {type(value).__name__}")
        value = int(value)
        return value if 0 <= value < count else None


def _charsmap(reader: _Reader) -> bytes | None:
    """`tokenizer.ggml.precompiled_charsmap`, SentencePiece's normalization rules, as bytes."""
    key = "tokenizer.ggml.precompiled_charsmap"
    value = reader.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.itemsize == 1 and value.dtype.kind in "iu":
        return value.tobytes()
    raise reader.fail(key, f"expected an array of bytes, got {type(value).__name__}")


def _check_tokens(reader: _Reader, tokens: list) -> list[str]:
    key = "tokenizer.ggml.tokens"
    tokens = [t.decode("utf-8", "replace") if isinstance(t, (bytes, bytearray)) else t for t in tokens]
    for index, text in enumerate(tokens):
        if not isinstance(text, str):
            raise reader.fail(key, f"entry {index} is {type(text).__name__}, not a string")
        if not text.isascii() and _SURROGATES.search(text):  # isascii is a flag: the check is cheap
            raise reader.fail(key, f"entry {index} holds a lone surrogate, which is not text")
    # Empty tokens are allowed (llama.cpp loads files that have several); other repeats are not.
    unique = set(tokens)
    if len(unique) - ("" in unique) != len(tokens) - tokens.count(""):
        first: dict[str, int] = {}
        for index, text in enumerate(tokens):
            if text and text in first:
                raise reader.fail(key, f"entries {first[text]} and {index} are both {text[:80]!r}")
            first[text] = index
    return tokens


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two tokens, best
    token score first (the order transformers' `generate_merges` produces, ties included).
    Tokens longer than MAX_MERGE_TOKEN_LEN get none."""
    # one sort of plain tuples: score, then the left part's and the right part's length, all
    # descending; ties in the token order, then by the parts' ids (transformers' order)
    found = []
    token_id = vocab.get
    for index, (piece, score) in enumerate(scores.items()):
        n = len(piece)
        if n > MAX_MERGE_TOKEN_LEN:
            continue
        for cut in range(1, n):
            left = token_id(piece[:cut])
            if left is not None:
                right = token_id(piece[cut:])
                if right is not None:
                    found.append((-score, -cut, cut - n, index, left, right, piece, cut))
    found.sort()
    return [(key[6][:key[7]], key[6][key[7]:]) for key in found]


def _split_merges(merges: list[str], vocab: dict[str, int], path: str) -> list[tuple[str, str]]:
    """Each merge as (left, right), split at the first space after the first character as llama.cpp
    does. Both halves and their join must be tokens: tokenizers panics on a join it lacks."""
    pairs = []
    for index, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1:]
        if cut < 0 or left not in vocab or right not in vocab or left + right not in vocab:
            raise FormatError(
                path, "tokenizer.ggml.merges", f"entry {index} ({merge[:80]!r}) does not join two tokens into a token"
            )
        pairs.append((left, right))
    return pairs


def _is_library_error(exc: BaseException) -> bool:
    # tokenizers raises plain Exceptions, and a Rust panic as pyo3's PanicException (a BaseException).
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a multi-byte character is unfinished."""
        piece = self._tokenizer.token_to_piece(token_id)  # checks the id
        if self._skip_special and int(token_id) in self._tokenizer.special_ids:
            return ""
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text to ids and back, for the vocabulary a GGUF file describes."""

    def __init__(
        self,
        *,
        model: str,
        tokens: list[str],
        token_types: list[int],
        scores: list[float],
        merges: list[str] | None,
        pre: str | None,
        architecture: str | None,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        chat_template: str | None,
        extra_ids: dict[str, int | None] | None = None,
        path: str = "GGUF metadata",
        sep_id: int | None = None,
        add_sep: bool = False,
        normalizer: tuple[bool, bool] = (True, True),
        charsmap: bytes | None = None,
        remove_extra_whitespaces: bool = False,
    ) -> None:
        self.path = path  # names the file in errors
        self.model = model
        self.pre = pre
        self.architecture = architecture
        self.tokens = tokens
        self.token_types = token_types
        self._scores = scores
        self._merges = merges
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.add_eos = bool(add_eos and eos_id is not None)
        self._eos_flag = bool(add_eos)  # the file's, for a pair's ends (the separator stands in for no EOS)
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.sep_id = sep_id  # appended by add_special ("bert"); between a pair's texts where add_sep
        self.add_sep = bool(add_sep and sep_id is not None)
        self._normalizer = normalizer  # "bert": lowercase, strip accents
        self._charsmap, self._remove_extra_whitespaces = charsmap, remove_extra_whitespaces  # "t5"
        if model in _OWN_ENGINES and unk_id is None:
            raise FormatError(path, "tokenizer.ggml.unknown_token_id", f"missing; a {model} vocabulary needs one")
        self._backend: _HFTokenizer | None = None
        self._engine: WordPiece | Unigram | None = None  # "bert" and "t5"
        self._pieces_cut: dict[bool, list[tuple[str, int]]] = {}  # "t5": tokens cut out whole
        self._lock = threading.Lock()  # guards the encode_special_tokens switch
        self._build_lock = threading.Lock()
        self._pieces: dict[int, bytes] = {}  # token_to_piece cache: streaming asks for each token
        self._find_special_tokens(extra_ids or {})

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a model file: GGUF (a vocabulary-only one too, such as llama.cpp's
        models/ggml-vocab-*.gguf) or a legacy ggml/ggmf/ggjt file."""
        from purelm.formats.ggml_legacy import open_model_file

        f = open_model_file(path)
        return cls.from_gguf_metadata(f.metadata, path=f.path)

    @classmethod
    def from_gguf_metadata(cls, meta: Any, path: str | os.PathLike | None = None) -> "Tokenizer":
        """Build from GGUF metadata: a mapping (or lazy mapping, or callable) of key to value.

        `path` names the file in errors: a missing or malformed value is a FormatError."""
        r = _Reader(meta, "GGUF metadata" if path is None else os.fspath(path))
        model = r.string("tokenizer.ggml.model")
        if model is None:
            raise r.fail("tokenizer.ggml.model", "missing; the file describes no tokenizer")
        if model not in SUPPORTED_MODELS:
            raise r.fail(
                "tokenizer.ggml.model", f"{model[:80]!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}"
            )
        tokens = r.array("tokenizer.ggml.tokens")
        if not tokens:
            raise r.fail("tokenizer.ggml.tokens", "missing or empty; the file has no vocabulary")
        tokens = _check_tokens(r, tokens)
        count = len(tokens)

        token_types = r.numbers("tokenizer.ggml.token_type", count, integer=True) or [TOKEN_NORMAL] * count
        bad = next((i for i, t in enumerate(token_types) if not 0 <= t <= _TOKEN_TYPE_MAX), None)
        if bad is not None:
            raise r.fail("tokenizer.ggml.token_type", f"entry {bad} is {token_types[bad]}, not a token type (0-6)")
        token_types = [int(t) for t in token_types]
        scores = [float(s) for s in r.numbers("tokenizer.ggml.scores", count, integer=False) or [0.0] * count]
        merges = r.array("tokenizer.ggml.merges") or None
        if model in ("gpt2", "gemma4") and merges is None:
            raise r.fail("tokenizer.ggml.merges", f"missing; a {model} (BPE) vocabulary needs merges")
        for index, merge in enumerate(merges or ()):
            if not isinstance(merge, str) or merge.find(" ", 1) < 0:
                raise r.fail("tokenizer.ggml.merges", f"entry {index} ({merge!r:.80}) is not two tokens and a space")

        pre = r.string("tokenizer.ggml.pre")

        def special_id(key: str) -> int | None:
            value = r.token_id(f"tokenizer.ggml.{key}_token_id", count)
            if value is None and model in _DEFAULT_IDS and r.get(f"tokenizer.ggml.{key}_token_id") is None:
                value = _DEFAULT_IDS[model].get(key)
                value = value if value is not None and value < count else None
            return value

        # The file's own flag wins; without one, llama.cpp's default for the vocabulary kind.
        add_bos_default = model == "llama" or (pre in _BPE_ADD_BOS_DEFAULT)
        return cls(
            model=model,
            tokens=tokens,
            token_types=token_types,
            scores=scores,
            merges=merges,
            pre=pre,
            architecture=r.string("general.architecture"),
            bos_id=special_id("bos"),
            eos_id=special_id("eos"),
            unk_id=special_id("unknown"),
            pad_id=special_id("padding"),
            # llama.cpp always adds BOS for gemma4 whatever the file says, and for "bert" BOS ([CLS])
            # first and the separator ([SEP]) last.
            add_bos=model in ("gemma4", "bert") or r.flag("tokenizer.ggml.add_bos_token", add_bos_default),
            add_eos=r.flag("tokenizer.ggml.add_eos_token", model == "t5"),
            add_space_prefix=r.flag("tokenizer.ggml.add_space_prefix", model != "t5"),
            chat_template=r.string("tokenizer.chat_template"),
            sep_id=special_id("seperator"),  # llama.cpp's spelling
            # (llama.cpp's defaults: WordPiece and RoBERTa-style vocabularies add a separator)
            add_sep=r.flag("tokenizer.ggml.add_sep_token",
                           model == "bert" or pre in ("roberta-bpe", "jina-v1-en", "jina-v2-code")),
            charsmap=_charsmap(r) if model == "t5" else None,
            remove_extra_whitespaces=r.flag("tokenizer.ggml.remove_extra_whitespaces", False),
            normalizer=(r.flag("tokenizer.ggml.normalizer.lowercase", True),
                        r.flag("tokenizer.ggml.normalizer.strip_accents",
                               r.flag("tokenizer.ggml.normalizer.lowercase", True))),
            extra_ids={
                key: r.token_id(f"tokenizer.ggml.{key}_token_id", count)
                for key in ("eot", "eom", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
            },
            path=r.path,
        )

    def _find_special_tokens(self, extra_ids: dict[str, int | None]) -> None:
        """Special ids (for skipping) and end-of-generation ids, in one pass over the vocabulary."""
        found: dict[str, int] = {}  # id of each text of interest (the last one, as llama.cpp's map keeps)
        defaults = self._default_specials()
        looked_for = _EOG_TEXTS.union(_EOT_TEXTS, _FIM_PRE_TEXTS, _FIM_SUF_TEXTS, _FIM_MID_TEXTS, _FIM_PAD_TEXTS,
                                      _FIM_REP_TEXTS, _FIM_SEP_TEXTS, defaults)
        for index, text in enumerate(self.tokens):
            if text in looked_for:
                found[text] = index

        def id_for(key: str, texts: list[str]) -> int | None:
            # The file's id when it gives one, else the first of llama.cpp's usual spellings.
            if extra_ids.get(key) is not None:
                return extra_ids[key]
            return next((found[t] for t in texts if t in found), None)

        self.eot_id = id_for("eot", _EOT_TEXTS)
        self.fim_pre_id = id_for("fim_pre", _FIM_PRE_TEXTS)
        self.fim_suf_id = id_for("fim_suf", _FIM_SUF_TEXTS)
        self.fim_mid_id = id_for("fim_mid", _FIM_MID_TEXTS)
        self.fim_rep_id = id_for("fim_rep", _FIM_REP_TEXTS)
        self.fim_sep_id = id_for("fim_sep", _FIM_SEP_TEXTS)
        eom_id = id_for("eom", ["<|eom_id|>"])
        eog = {index for text, index in found.items() if text in _EOG_TEXTS}
        for key, texts in (("fim_pad", _FIM_PAD_TEXTS), ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS)):
            index = id_for(key, texts)
            if index is not None:
                eog.add(index)
        eog.update(i for i in (self.eos_id, self.eot_id, eom_id) if i is not None)
        texts = {self.tokens[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message there, not the generation.
        if "<|end|>" in texts and (
            ("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
            or ("<|flush|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
        ):
            eog.discard(texts["<|end|>"])
        # gemma4 / paddleocr: "</s>" is not an end token when "<|tool_response>" is.
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])
        self.eog_ids: set[int] = eog

        # What transformers treats as special: control tokens, the declared special tokens, and its
        # tokenizer class's default special tokens when the vocabulary has them.
        special = {index for index, kind in enumerate(self.token_types) if kind == TOKEN_CONTROL}
        special.update(i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id) if i is not None)
        special.update(found[t] for t in defaults if t in found)
        self.special_ids: set[int] = special

    def _default_specials(self) -> tuple[str, ...]:
        if self.model == "gemma4" or (self.model == "llama" and self.architecture in _GEMMA_ARCHS):
            return _DEFAULT_SPECIALS["gemma"]
        return _DEFAULT_SPECIALS[self.model]

    @property
    def backend(self) -> _HFTokenizer:
        """The `tokenizers.Tokenizer` doing the work, built on first use."""
        if self._backend is None:
            with self._build_lock:
                if self._backend is None:
                    self._backend = self._build_backend()
        return self._backend

    def _build_backend(self) -> _HFTokenizer:
        try:
            return self._build_backend_unchecked()
        except BaseException as exc:
            if isinstance(exc, PurelmError) or not _is_library_error(exc):
                raise
            raise FormatError(
                self.path, "tokenizer", f"cannot build the {self.model} tokenizer from the metadata: {exc}"
            ) from exc

    def _build_backend_unchecked(self) -> _HFTokenizer:
        if self.model in _OWN_ENGINES:  # encode and decode run purelm.wordpiece / purelm.unigram instead
            raise UsageError(f"a {self.model} vocabulary has no tokenizers backend")
        if self.model == "gpt2":
            backend, vocab = self._build_byte_level()
        elif self.model == "gemma4":
            backend, vocab = self._build_gemma4()
        else:
            backend, vocab = self._build_sentencepiece()
        # Added tokens are matched whole in the text before BPE runs: control tokens as special
        # ones, user-defined ones (like "<think>") as plain ones, as transformers adds them.
        special_texts = [self.tokens[i] for i in sorted(self.special_ids)]
        special = [AddedToken(t, normalized=False, special=True) for t in special_texts if t in vocab]
        backend.add_special_tokens(special)
        user_defined = [
            AddedToken(text, normalized=False, special=False)
            for text, kind in zip(self.tokens, self.token_types)
            if kind == TOKEN_USER_DEFINED and text in vocab
        ]
        if user_defined:
            backend.add_tokens(user_defined)
        return backend

    def _build_byte_level(self) -> tuple[_HFTokenizer, dict[str, int]]:
        vocab: dict[str, int] = {}
        for index, (text, kind) in enumerate(zip(self.tokens, self.token_types)):
            # A user-defined or control token is matched whole in the raw text (MPT's runs of spaces,
            # DeepSeek's "<｜begin▁of▁sentence｜>"): it keeps its text, and its respelling ("ĠĠ") stays
            # the BPE token it is.
            if kind not in (TOKEN_USER_DEFINED, TOKEN_CONTROL) and not set(text) <= _BYTE_ALPHABET:
                text = "".join(_CHAR_OF_BYTE[b] for b in text.encode("utf-8"))  # stored as plain text
            if text:  # an empty token can never be matched; keep it out of tokenizers
                vocab[text] = index
        merges = _split_merges(self._merges or [], vocab, self.path)
        splits = _SPLITS.get(self.pre or "default")
        backend = _HFTokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                ignore_merges=self.pre in _IGNORE_MERGES,
            )
        )
        if splits is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits]
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
            backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        return backend, vocab

    def _build_gemma4(self) -> tuple[_HFTokenizer, dict[str, int]]:
        # llama.cpp's "gemma4": BPE by merge rank over raw UTF-8, spaces written "▁", no space prefix,
        # text cut only between lines and runs of newlines; a character no merge reaches falls back to
        # its <0xNN> bytes. A run of newlines that is a token is taken whole (encode does that).
        vocab = {text: index for index, text in enumerate(self.tokens) if text}
        merges = _split_merges(self._merges or [], vocab, self.path)
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, dropout=None))
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return backend, vocab

    def _build_sentencepiece(self) -> tuple[_HFTokenizer, dict[str, int]]:
        gemma = self.architecture in _GEMMA_ARCHS
        tokens = self.tokens
        if gemma:
            # Gemma stores whitespace-only tokens with real spaces; its merges expect "▁".
            tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {text: index for index, text in enumerate(tokens) if text}
        if self._merges is not None:
            merges = _split_merges(self._merges, vocab, self.path)
        elif gemma:
            # Gemma's scores do not follow its merge order; the token order does.
            merges = _merges_from_scores(vocab, {text: -index for index, text in enumerate(tokens)})
        else:
            merges = _merges_from_scores(vocab, dict(zip(tokens, self._scores)))

        if gemma:
            unk = "<unk>" if "<unk>" in vocab else None
            backend = _HFTokenizer(
                models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True)
            )
            backend.normalizer = normalizers.Replace(" ", "▁")
            backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
            backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
            return backend, vocab

        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_space_prefix:
            # As sentencepiece and llama.cpp do: every run of text (the start, and after each special
            # token) gets a "▁" prefix, even when it already starts with a space.
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            steps.append(decoders.Strip(content=" ", left=1))
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        backend.decoder = decoders.Sequence(steps)
        return backend, vocab

    # --- use ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`.

        add_special: put BOS first / EOS last when the file asks for them.
        parse_special: special-token text such as "<|im_start|>" becomes its id; when False it is
        tokenized as ordinary text (user-defined tokens like "<think>" are still matched whole).

        A lone surrogate is not text (Python makes them of invalid UTF-8 read with
        errors="surrogateescape", as in sys.argv): each one is encoded as U+FFFD, the replacement
        character, as a decoder replacing bad bytes would give.
        """
        if not isinstance(text, str):
            raise UsageError(f"encode: expected str, got {type(text).__name__}")
        text = _SURROGATES.sub("\ufffd", text)
        if self.model in _OWN_ENGINES:
            return self._encode_own(text, add_special, parse_special)
        backend = self.backend
        # The switch lives on the shared backend, so every encode holds the lock while it is set.
        with self._lock:
            backend.encode_special_tokens = not parse_special
            try:
                ids = backend.encode(text, add_special_tokens=False).ids
            finally:
                backend.encode_special_tokens = False
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def encode_pair(self, first: str, second: str) -> list[int]:
        """Two texts as one input, as llama.cpp's reranking joins a query and a document (special-token
        text in them stays text): see join_pair."""
        return self.encode_pairs(first, [second])[0]

    def encode_pairs(self, first: str, seconds: Sequence[str]) -> list[list[int]]:
        """encode_pair(first, s) for each s of `seconds`, `first` tokenized once."""
        a = self.encode(first, add_special=False, parse_special=False)
        return [self.join_pair(a, self.encode(s, add_special=False, parse_special=False)) for s in seconds]

    def join_pair(self, first: list[int], second: list[int]) -> list[int]:
        """Two texts' ids as one input: BOS, the first, EOS (the separator where the vocabulary has no
        EOS), the separator where the file asks for one, the second, EOS: "[CLS] q [SEP] d [SEP]" for
        BERT, "<s> q </s></s> d </s>" for RoBERTa."""
        end = self.eos_id if self.eos_id is not None else self.sep_id
        closing = [end] if end is not None and self._eos_flag else []
        return ([self.bos_id] if self.add_bos else []) + first + closing + ([self.sep_id] if self.add_sep else []) \
            + second + closing

    def _own_engine(self) -> WordPiece | Unigram:
        if self._engine is None:
            with self._build_lock:
                if self._engine is None and self.model == "bert":
                    lowercase, strip_accents = self._normalizer
                    self._engine = WordPiece(self.tokens, self.unk_id, lowercase=lowercase,
                                             strip_accents=strip_accents)
                elif self._engine is None:
                    self._engine = Unigram(self.tokens, self.token_types, self._scores, self.unk_id,
                                           charsmap=self._charsmap, add_space_prefix=self.add_space_prefix,
                                           remove_extra_whitespaces=self._remove_extra_whitespaces, path=self.path)
        return self._engine

    def _encode_own(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        ids = self._own_engine().encode(text, self._special_pieces(parse_special))
        if add_special and self.model == "bert":  # llama.cpp: [CLS] ... [SEP], whatever the flags say
            ids = [self.bos_id] * self.add_bos + ids + [self.sep_id] * (self.sep_id is not None)
        elif add_special:
            ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos
        return ids

    def _special_pieces(self, parse_special: bool) -> list[tuple[str, int]]:
        """Tokens cut out of the text whole, longest first, as llama.cpp does: user-defined ones, and
        control and unknown ones when special text is parsed."""
        cached = self._pieces_cut.get(parse_special)
        if cached is None:
            kinds = (TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNKNOWN) if parse_special else (TOKEN_USER_DEFINED,)
            found = [(t, i) for i, (t, k) in enumerate(zip(self.tokens, self.token_types)) if t and k in kinds]
            cached = self._pieces_cut[parse_special] = sorted(found, key=lambda entry: -len(entry[0]))
        return cached

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        try:
            checked = [operator.index(i) for i in ids]
        except TypeError:
            raise UsageError(f"token ids must be integers, got {ids!r:.80}") from None
        for index in checked:
            if not 0 <= index < self.vocab_size:
                raise UsageError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return checked

    def decode(self, ids: Sequence[int] | Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`, exactly as transformers decodes them; "bert" and "t5" as llama.cpp does
        (without the first word's space, and for "bert" its clean-up of spaces before punctuation)."""
        if self.model in _OWN_ENGINES:
            pieces = b"".join(self.token_to_piece(i) for i in self._check_ids(ids)
                              if not (skip_special and i in self.special_ids)).decode("utf-8", "replace")
            if self.model == "bert":
                return detokenize(pieces)
            return pieces[1:] if self.add_space_prefix and pieces.startswith(" ") else pieces
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def token_to_piece(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (special tokens give their text)."""
        (index,) = self._check_ids([token_id])
        piece = self._pieces.get(index)
        if piece is None:
            piece = self._pieces[index] = self._piece_of(index)
        return piece

    def _piece_of(self, index: int) -> bytes:
        text, kind = self.tokens[index], self.token_types[index]
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            return text.encode("utf-8")
        if self.model == "gpt2":
            # Characters outside the byte alphabet mean the token was stored as plain text.
            return b"".join(
                bytes((_BYTE_OF_CHAR[c],)) if c in _BYTE_OF_CHAR else c.encode("utf-8") for c in text
            )
        if kind == TOKEN_BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            try:
                return bytes((int(text[3:5], 16),))
            except ValueError:  # not hex digits: a misnamed token, taken as text
                pass
        return text.replace("▁", " ").encode("utf-8")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time, for printing text as it is generated."""
        return StreamDecoder(self, skip_special=skip_special)

    def is_eog(self, token_id: int) -> bool:
        """Whether generation should stop at this token."""
        return int(token_id) in self.eog_ids

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"
