"""Chat: a conversation rendered by the model's chat template, and what comes back parsed.

A GGUF file may carry a Jinja chat template (`tokenizer.chat_template`), written for Hugging Face's
`apply_chat_template`. It is rendered here the way transformers renders it (the same variables and
filters, `trim_blocks` and `lstrip_blocks`), but a model file is untrusted input: a template in a GGUF
once ran code on users' machines through another Python binding (CVE-2024-34359). So templates run in
Jinja2's `ImmutableSandboxedEnvironment`, and more is bounded than the sandbox bounds on its own:

- reaching for Python internals (`''.__class__`, `cycler.__init__.__globals__`, ...) fails at once, not
  later as an empty string;
- every loop iteration, call and filter counts against a step budget and a deadline, so no template
  runs forever (nested `range(100000)` loops included);
- every character a template writes (into its output or into a captured block) and every string its
  operators, filters and calls create counts against a budget; single operations that would allocate
  without bound (`'x' * 10**9`, `10 ** 10 ** 9`, `'x'|center(10**9)`, huge format widths, ...) are
  refused before they run; the output is capped.

Whatever goes wrong is one `TemplateError` naming the problem.

A file without a template gets a built-in one, chosen as llama.cpp chooses (`llm_chat_detect_template`
in its src/llama-chat.cpp, which also maps a template's text to its family): by the tokens of the
vocabulary, chatml when nothing matches.

The package: `builtins` (the built-in templates and detection), `sandbox` (the limits and the Jinja
environment), `messages` (messages and tools checked, the tools polyfill), `tool_calls` (tool calls
parsed out of replies); here, `ChatTemplate`, `ChatCompletion` and `fit_messages`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TemplateError, UsageError
from .builtins import (BUILTIN_TEMPLATES, CHATML, GEMMA, LLAMA_2, LLAMA_3, MISTRAL, PHI_3, TURN_ENDS,
                       canonical_name, detect_builtin, detect_family)
from .messages import _polyfill_tools, validate_messages, validate_tools
from .sandbox import (MAX_DEPTH, MAX_FORMAT_WIDTH_DIGITS, MAX_INT_BITS, MAX_OUTPUT_CHARS, MAX_SECONDS, MAX_STEPS,
                      MAX_TEMPLATE_CHARS, MAX_WIDTH, MAX_WORK_CHARS, _Budget, _budget, _environment, _Limit, _local,
                      _template_error)
from .tool_calls import parse_tool_calls

__all__ = [
    "MAX_TEMPLATE_CHARS", "MAX_OUTPUT_CHARS", "MAX_WORK_CHARS", "MAX_STEPS", "MAX_SECONDS", "MAX_WIDTH",
    "MAX_INT_BITS", "MAX_FORMAT_WIDTH_DIGITS", "MAX_DEPTH",
    "CHATML", "LLAMA_2", "LLAMA_3", "GEMMA", "PHI_3", "MISTRAL", "BUILTIN_TEMPLATES", "TURN_ENDS",
    "canonical_name", "detect_family", "detect_builtin",
    "validate_messages", "validate_tools", "parse_tool_calls",
    "ChatTemplate", "ChatCompletion", "fit_messages",
    "TemplateError", "UsageError",
]


# --- the template ----------------------------------------------------------------------------------

class ChatTemplate:
    """A chat template, compiled in the sandbox, with what a reply in its format stops at.

    `name`: the family ("chatml", "llama-2", "llama-3", "gemma", "phi-3", "mistral") the template is or
    belongs to, or "custom". `source`: the Jinja text. `is_builtin`: whether it is one of purelm's own.
    `stop_token_ids`: the vocabulary's end-of-generation ids. `stop_strings`: the family's end-of-turn
    texts. `bos_token` / `eos_token`: the texts the template sees."""

    def __init__(self, source: str, *, name: str | None = None, bos_token: str = "", eos_token: str = "",
                 tokenizer: Any = None, builtin: bool = False, tool_use_source: str | None = None,
                 extra_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str):
            raise UsageError(f"a chat template must be a str, got {type(source).__name__}")
        self.source = source
        self.is_builtin = builtin
        self.name = name or detect_family(source) or "custom"
        self.bos_token, self.eos_token = bos_token, eos_token
        self.tokenizer = tokenizer
        self._extra_tokens = dict(extra_tokens or {})
        self.stop_token_ids: frozenset[int] = frozenset(getattr(tokenizer, "eog_ids", ()) or ())
        self.stop_strings: tuple[str, ...] = TURN_ENDS.get(self.name, ())
        self._template = self._compile(source, "the chat template" if not builtin else f"the {self.name} template")
        self._tool_use = None if tool_use_source is None else \
            self._compile(tool_use_source, "the chat template for tool use")
        self._tool_use_source = tool_use_source

    @staticmethod
    def _compile(source: str, where: str) -> Any:
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"{where} is {len(source)} characters long (the limit is {MAX_TEMPLATE_CHARS})")
        env = _environment()
        try:
            template = env.from_string(source)
        except Exception as e:  # a syntax error, or a parser driven too deep
            raise _template_error(e, where) from None
        template._purelm_where = where
        return template

    # -- construction
    @classmethod
    def builtin_names(cls) -> tuple[str, ...]:
        return tuple(BUILTIN_TEMPLATES)

    @classmethod
    def builtin(cls, name: str, tokenizer: Any = None, bos_token: str | None = None,
                eos_token: str | None = None) -> "ChatTemplate":
        """One of the built-in templates: chatml, llama-2, llama-3, gemma, phi-3, mistral (also llama2,
        llama3, phi3, mistral-v3). With a tokenizer, its BOS/EOS texts and end-of-generation ids."""
        key = canonical_name(name) if isinstance(name, str) else None
        if key is None:
            raise UsageError(f"unknown chat template {name!r}; built in: {', '.join(BUILTIN_TEMPLATES)}")
        bos, eos = _special_texts(tokenizer)
        return cls(BUILTIN_TEMPLATES[key], name=key, builtin=True, tokenizer=tokenizer,
                   bos_token=bos if bos_token is None else bos_token,
                   eos_token=eos if eos_token is None else eos_token,
                   extra_tokens=_extra_texts(tokenizer))

    @classmethod
    def from_gguf(cls, metadata: Any, tokenizer: Any) -> "ChatTemplate":
        """The file's template (`tokenizer.chat_template`; `tokenizer.chat_template.tool_use` too, for
        requests with tools), or a built-in one for a file without (see `detect_builtin`). A template
        whose whole text is a built-in's name (as llama.cpp allows) is that built-in."""
        get = metadata.get if hasattr(metadata, "get") else (lambda k: None)
        source = get("tokenizer.chat_template")
        tool_use = get("tokenizer.chat_template.tool_use")
        tool_use = tool_use if isinstance(tool_use, str) and tool_use.strip() else None
        if not isinstance(source, str) or not source.strip():
            if tool_use is None:
                name = detect_builtin(getattr(tokenizer, "tokens", ()) or (), get("general.name")
                                      if isinstance(get("general.name"), str) else None,
                                      getattr(tokenizer, "model", None))
                return cls.builtin(name, tokenizer)
            source, tool_use = tool_use, None
        return cls.from_text(source, tokenizer, tool_use)

    @classmethod
    def from_text(cls, source: str, tokenizer: Any, tool_use_source: str | None = None) -> "ChatTemplate":
        """A template's Jinja text (a file's, or one given on the command line, as untrusted as any),
        with the tokenizer's BOS/EOS texts; a text that is a built-in's name is that built-in."""
        if not isinstance(source, str):
            raise UsageError(f"a chat template must be a str, got {type(source).__name__}")
        named = canonical_name(source) if len(source) < 32 else None
        if named is not None:
            return cls.builtin(named, tokenizer)
        bos, eos = _special_texts(tokenizer)
        return cls(source, bos_token=bos, eos_token=eos, tokenizer=tokenizer, tool_use_source=tool_use_source,
                   extra_tokens=_extra_texts(tokenizer))

    # -- rendering
    def render(self, messages: Any, add_generation_prompt: bool = True, tools: Any = None, **extra: Any) -> str:
        """The conversation as the template writes it (Hugging Face's `apply_chat_template(...,
        tokenize=False)`). `extra`: more template variables (e.g. enable_thinking=False).
        A malformed message raises UsageError; anything that goes wrong in the template, TemplateError."""
        msgs = validate_messages(messages)
        tools = validate_tools(tools)
        template = self._tool_use if tools and self._tool_use is not None else self._template
        source = self._tool_use_source if template is self._tool_use else self.source
        variables = {**self._extra_tokens, "bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "tools": tools, "add_generation_prompt": bool(add_generation_prompt)}

        def run(msgs: list[dict]) -> str:
            msgs = _polyfill_tools(msgs, tools, native_tools=bool(re.search(r"\btools\b", source)),
                                   native_calls="tool_calls" in source,
                                   native_role=bool(re.search(r"""['"](tool|ipython)['"]""", source)))
            return self._run(template, {**variables, "messages": msgs})

        try:
            return run(msgs)
        except TemplateError as first:
            # Most templates write tool-call arguments with |tojson and want the object; a few add
            # them to strings as they came: try those with the arguments as given.
            as_given = validate_messages(messages, object_arguments=False)
            if getattr(first, "kind", "") != "error" or as_given == msgs:
                raise
            try:
                return run(as_given)
            except TemplateError:
                raise first from None

    @staticmethod
    def _run(template: Any, variables: dict) -> str:
        where = template._purelm_where
        previous = _budget()
        _local.budget = _Budget(variables)
        pieces, total = [], 0
        try:
            for piece in template.generate(**variables):
                total += len(piece)
                if total > MAX_OUTPUT_CHARS:
                    raise _Limit(f"its output is longer than {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # the template is untrusted: whatever it raised is its error
            raise _template_error(e, where) from None
        finally:
            _local.budget = previous
        return "".join(pieces)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered conversation: special-token text becomes its token, and BOS is put
        first when the vocabulary asks for it and the template did not write it (llama.cpp strips a
        template's BOS before adding its own; transformers adds none: either way, one BOS)."""
        tok = self.tokenizer
        if tok is None:
            raise UsageError("this chat template has no tokenizer: build it with from_gguf or builtin(name, tokenizer)")
        ids = tok.encode(text, add_special=False, parse_special=True)
        if getattr(tok, "add_bos", False) and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def apply(self, messages: Any, tools: Any = None, add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """`render`, then `encode`: the prompt's token ids."""
        return self.encode(self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra))

    @property
    def call_format(self) -> str:
        """The format this template shows the model for tool calls (chat.tool_calls.call_grammar's
        `fmt`): the template's own where it renders tools (Mistral's `[TOOL_CALLS]`, Llama 3's JSON,
        else Hermes' `<tool_call>`), else the Hermes format that purelm's polyfill describes."""
        source = self._tool_use_source or self.source
        if not re.search(r"\btools\b", source):
            return "hermes"
        if "[TOOL_CALLS]" in source:  # v0.3's [{"name": ..., "arguments": ...}], or later ones' name[ARGS]{...}
            return "mistral_args" if "[ARGS]" in source else "mistral"
        return "llama3" if self.name == "llama-3" else "hermes"

    def parse_tool_calls(self, text: str, tools: Any = None) -> tuple[str, list[dict]]:
        """See the module function `parse_tool_calls`."""
        return parse_tool_calls(text, tools)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, is_builtin={self.is_builtin}, {len(self.source)} characters)"


def template_choice(name: str | None, text: str | None,
                    fields: tuple[str, str] = ("--chat-template", "--chat-template-file")) -> tuple[str, str] | None:
    """A chat template in place of a model's own, checked before any model loads: a built-in's name
    ("name", NAME) or a Jinja template's text ("text", TEXT, compiled here), at most one of them; None
    for neither. `fields` name the two in errors."""
    from .builtins import canonical_name

    if name is not None and text is not None:
        raise UsageError(f"give one of {fields[0]} and {fields[1]}")
    if name is not None:
        if canonical_name(name) is None:
            raise UsageError(f"{fields[0]} {name!r:.80}: not a built-in template "
                             f"({', '.join(ChatTemplate.builtin_names())}); a Jinja template: {fields[1]}")
        return "name", name
    if text is not None:
        ChatTemplate(text)  # a broken template fails now, not at the first message
        return "text", text
    return None


def use_template_choice(llm: Any, choice: tuple[str, str] | None) -> Any:
    """Give the loaded model (a purelm.LLM) the template `template_choice` returned; its template."""
    if choice is not None:
        kind, value = choice
        llm.chat_template = value if kind == "name" else ChatTemplate.from_text(value, llm.tokenizer)
    return llm.chat_template


def _special_texts(tokenizer: Any) -> tuple[str, str]:
    def text(i: Any) -> str:
        tokens = getattr(tokenizer, "tokens", None)
        return tokens[i] if tokens is not None and isinstance(i, int) and 0 <= i < len(tokens) else ""
    return text(getattr(tokenizer, "bos_id", None)), text(getattr(tokenizer, "eos_id", None))


def _extra_texts(tokenizer: Any) -> dict[str, str]:
    tokens = getattr(tokenizer, "tokens", None)
    out = {}
    for key, attr in (("unk_token", "unk_id"), ("pad_token", "pad_id")):
        i = getattr(tokenizer, attr, None)
        if tokens is not None and isinstance(i, int) and 0 <= i < len(tokens):
            out[key] = tokens[i]
    return out


@dataclass
class ChatCompletion:
    """A chat reply: `text` as generated, `content` the text without its tool calls, `tool_calls` in
    OpenAI's form, `finish_reason` "stop", "length" or "tool_calls", and the token counts."""

    text: str
    content: str
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def message(self) -> dict:
        """The reply as a message to append to the conversation (OpenAI's form)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not self.tool_calls
                               else None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


# --- long conversations ----------------------------------------------------------------------------

def fit_messages(messages: Sequence[Mapping], count_tokens: Callable[[list], int],
                 budget: int) -> tuple[list, int]:
    """llama.cpp's context shift for a conversation: the messages whose rendering takes at most
    `budget` tokens (`count_tokens(messages)`), dropping the oldest turns after the system prompt
    (the leading system messages stay; a turn starts at a user message). Returns (messages, how many
    were dropped). When even the last turn alone is too long, that is what comes back, still too long:
    the caller decides."""
    msgs = list(messages)
    if count_tokens(msgs) <= budget:
        return msgs, 0
    head = 0
    while head < len(msgs) and msgs[head].get("role") == "system":
        head += 1
    cuts = [i for i in range(head + 1, len(msgs)) if msgs[i].get("role") == "user"]
    if not cuts:
        return msgs, 0
    lo, hi = 0, len(cuts) - 1  # find the first cut that fits (fewer dropped turns: longer prompt)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(msgs[:head] + msgs[cuts[mid]:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cut = cuts[lo]
    return msgs[:head] + msgs[cut:], cut - head
