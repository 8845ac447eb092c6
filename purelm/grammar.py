"""Constrained decoding: every generated token must keep the reply inside a grammar, a JSON schema or
llama.cpp's GBNF, applied token by token with llguidance (the library llama.cpp and vLLM use; it
reads purelm's vocabulary as bytes). `compile_grammar` checks a grammar once; a `Constraint` per
sequence masks the logits before each sample and follows the tokens taken.

    from purelm.grammar import compile_grammar
    g = compile_grammar(llm.tokenizer, "json_schema", {"type": "object"})
    llm.generate("A JSON object:", grammar=g)      # or json_schema=..., or a GBNF string as grammar="root ::= ..."
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

from .errors import GenerationError, UsageError

KINDS = ("json_schema", "gbnf", "lark")  # a JSON schema (dict), llama.cpp's GBNF, llguidance's Lark (str)
_WHAT = {"json_schema": "JSON schema", "gbnf": "grammar", "lark": "grammar"}
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {eos ids: LLTokenizer}
_lock = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 (the masks)
    except ImportError:
        raise UsageError("structured output (a grammar or JSON schema) needs llguidance: pip install llguidance "
                         "(it comes with 'purelm[server]')") from None
    return llguidance


def grammar_tokenizer(tokenizer: Any, extra_eos: frozenset[int] = frozenset()) -> Any:
    """llguidance's view of the vocabulary (built once per tokenizer and end-of-generation set, ~0.3 s):
    every token's bytes, special tokens marked as llguidance expects, the vocabulary's end-of-generation
    tokens and `extra_eos` (a chat template's end-of-turn tokens) as its EOS."""
    llguidance = _llguidance()
    eos = tuple(sorted(set(tokenizer.eog_ids) | set(extra_eos)))
    with _lock:
        known = _vocabularies.setdefault(tokenizer, {})
        if eos not in known:
            special = set(tokenizer.special_ids)

            class _Vocab:
                tokens = [(b"\xff" if i in special else b"") + tokenizer.token_to_piece(i)
                          for i in range(tokenizer.vocab_size)]
                eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
                bos_token_id = tokenizer.bos_id
                special_token_ids = sorted(special)

                def __call__(self, data: bytes | str) -> list[int]:
                    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                    return tokenizer.encode(text, add_special=False, parse_special=False)

            known[eos] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), n_vocab=tokenizer.vocab_size,
                                                eos_token=list(eos) or [_Vocab.eos_token_id])
        return known[eos]


def compile_grammar(tokenizer: Any, kind: str, value: Any, extra_eos: frozenset[int] = frozenset()) -> str:
    """llguidance's grammar for `value` of `kind` ("json_schema": a dict; "gbnf": llama.cpp's GBNF text;
    "lark": llguidance's Lark text), checked against this vocabulary: UsageError naming the problem."""
    if kind not in KINDS:
        raise UsageError(f"a grammar's kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "json_schema" and not isinstance(value, dict):
        raise UsageError(f"a JSON schema must be a dict, got {type(value).__name__}")
    if kind != "json_schema" and not isinstance(value, str):
        raise UsageError(f"a grammar must be a str, got {type(value).__name__}")
    llguidance = _llguidance()
    what = _WHAT[kind]
    try:
        if kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(value))
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(value)
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(json.dumps(value)))
    except Exception as e:  # llguidance's own errors, or a schema JSON cannot write
        raise UsageError(f"the {what} is invalid: {e}") from None
    err = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer(tokenizer, extra_eos))
    if err and not err.startswith("WARNING"):
        raise UsageError(f"the {what} is invalid: {err}")
    return grammar


class Constraint:
    """One sequence's place in a compiled grammar: `mask` sets the logits of every token the grammar
    does not allow next to -inf; `accept` moves past a token taken (one the mask allowed)."""

    def __init__(self, tokenizer: Any, grammar: str, extra_eos: frozenset[int] = frozenset()) -> None:
        llguidance = _llguidance()
        self.n_vocab = tokenizer.vocab_size
        self.eos = set(tokenizer.eog_ids) | set(extra_eos)  # the tokens that end a reply the grammar ends
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, extra_eos), grammar)
        if self.matcher.is_error():
            raise UsageError(f"the grammar is invalid: {self.matcher.get_error()}")
        self._bits = llguidance.numpy.allocate_token_bitmask(1, self.n_vocab)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self.matcher, self._bits, 0)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        if not allowed.any():
            raise GenerationError(f"the grammar allows no token: {self.matcher.get_error() or 'a dead end'}")
        out = np.full_like(logits, -np.inf)
        out[:self.n_vocab][allowed] = logits[:self.n_vocab][allowed]
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GenerationError(f"the grammar refused token {token}: {self.matcher.get_error()}")
