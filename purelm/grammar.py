"""Constrained decoding: every generated token must keep the reply inside a grammar, a JSON schema or
llama.cpp's GBNF, applied token by token with llguidance (the library llama.cpp and vLLM use; it
reads purelm's vocabulary as bytes). `compile_grammar` checks a grammar once; a `Constraint` per
sequence masks the logits before each sample and follows the tokens taken. The API takes them as
`llm.generate("A JSON object:", json_schema={"type": "object"})` or `grammar='root ::= "yes" | "no"'`
(GBNF text); `forced_call` is the grammar of a chat's tool_choice "required" or a named function.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

from .chat.tool_calls import call_grammar
from .errors import GenerationError, UsageError

KINDS = ("json_schema", "gbnf", "lark")  # a JSON schema (dict), llama.cpp's GBNF, llguidance's Lark (str)
_WHAT = {"json_schema": "JSON schema", "gbnf": "grammar", "lark": "grammar"}
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {eos ids: LLTokenizer}
_lock = threading.Lock()  # guards _vocabularies; each vocabulary is built under a lock of its own key


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 (the masks)
    except ImportError:
        raise UsageError("structured output (a grammar or JSON schema) needs llguidance: pip install llguidance "
                         "(it comes with 'purelm[server]')") from None
    return llguidance


def grammar_tokenizer(tokenizer: Any, extra_eos: frozenset[int] = frozenset()) -> Any:
    """llguidance's view of the vocabulary (built once per tokenizer and end-of-generation set; under a
    second for SmolLM2's 49,152 tokens):
    every token's bytes, special tokens marked as llguidance expects, the vocabulary's end-of-generation
    tokens and `extra_eos` (a chat template's end-of-turn tokens) as its EOS."""
    llguidance = _llguidance()
    eos = tuple(sorted(set(tokenizer.eog_ids) | set(extra_eos)))
    with _lock:
        known = _vocabularies.setdefault(tokenizer, {})
        entry = known.setdefault(eos, [threading.Lock(), None])
    with entry[0]:  # one build per key; other keys (and their users) do not wait for it
        if entry[1] is None:
            special = set(tokenizer.special_ids)
            owner = weakref.ref(tokenizer)  # the cache must not keep the tokenizer alive

            class _Vocab:
                tokens = [(b"\xff" if i in special else b"") + tokenizer.token_to_piece(i)
                          for i in range(tokenizer.vocab_size)]
                eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
                bos_token_id = tokenizer.bos_id
                special_token_ids = sorted(special)

                def __call__(self, data: bytes | str) -> list[int]:
                    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                    tok = owner()
                    return [] if tok is None else tok.encode(text, add_special=False, parse_special=False)

            entry[1] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), n_vocab=tokenizer.vocab_size,
                                              eos_token=list(eos) or [_Vocab.eos_token_id])
        return entry[1]


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


def forced_call(tokenizer: Any, fmt: str, tools: list[dict], name: str | None = None, several: bool = False, *,
                extra_eos: frozenset[int] = frozenset()) -> str:
    """The compiled grammar of a reply that is one tool call (with `several`, one or more;
    chat.tool_calls.call_grammar) in the format `fmt`, of the function `name` or of any of `tools`; a
    tool whose parameters do not compile is named in the UsageError."""
    from .chat.messages import validate_tools

    tools = validate_tools(tools) or []
    for i, t in enumerate(tools):
        if name is None or t["function"]["name"] == name:
            try:
                compile_grammar(tokenizer, "json_schema", t["function"].get("parameters") or {"type": "object"})
            except UsageError as e:
                raise UsageError(f"tools[{i}] ({t['function']['name']!r:.80}): {e}") from None
    markers = {}
    for text in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]"):
        ids = tokenizer.encode(text, add_special=False, parse_special=True)
        if len(ids) == 1 and ids[0] in tokenizer.special_ids:  # a control token: by id, as it is sampled
            markers[text] = f"<[{ids[0]}]>"
    return compile_grammar(tokenizer, "lark", call_grammar(fmt, tools, name, markers, several), extra_eos)


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
