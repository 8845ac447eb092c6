"""Tool calls read back out of a reply (Hermes / Qwen, Mistral and Llama 3 formats) into OpenAI's
form, with the call ids made for them."""
from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from ..errors import UsageError
from .messages import validate_tools

_ID_CHARS = string.ascii_letters + string.digits


def _call_id(mistral: bool = False) -> str:
    # Mistral's templates insist on 9 alphanumeric characters; OpenAI's look like call_...
    if mistral:
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def _json_value(text: str, start: int = 0) -> tuple[Any, int] | None:
    """The JSON value at text[start:] (after spaces) and where it ends, or None."""
    decoder = json.JSONDecoder()
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        return decoder.raw_decode(text, i)
    except (ValueError, RecursionError):
        return None


def _make_call(obj: Any, names: set[str] | None = None, mistral: bool = False) -> dict | None:
    """OpenAI's tool call for a parsed {"name": ..., "arguments"/"parameters": ...}, or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except (ValueError, RecursionError):
            return None
    else:
        try:
            args = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            return None
    given = obj.get("id")
    ok_id = isinstance(given, str) and given and (not mistral or (len(given) == 9 and given.isalnum()))
    return {"id": given if ok_id else _call_id(mistral), "type": "function",
            "function": {"name": name, "arguments": args}}


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_MISTRAL_NAMED = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]+)\s*)?\[ARGS\]")


def parse_tool_calls(text: str, tools: Any = None) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a reply, tool calls in OpenAI's form ({"id": "call_...", "type":
    "function", "function": {"name": ..., "arguments": "<JSON>"}}), read from the formats of the
    templates supported:

    - Hermes / Qwen 2.5 / SmolLM3 (and the format given to templates without tools):
      `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them content;
    - Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}`;
    - Llama 3.1-3.3: the whole reply is `{"name": ..., "parameters": {...}}` (or several, separated by
      ';'), maybe after `<|python_tag|>`; with `tools` given, only calls of those names count.

    Never raises on what a model wrote: anything that does not parse stays content."""
    if not isinstance(text, str):
        raise UsageError(f"text must be a str, got {type(text).__name__}")
    names = None
    if tools:
        try:
            names = {t["function"]["name"] for t in validate_tools(tools) or ()}
        except UsageError:
            names = None
    try:
        return _parse_calls(text, names)
    except RecursionError:
        return text, []


def _parse_calls(text: str, names: set[str] | None) -> tuple[str, list[dict]]:
    if "<tool_call>" in text:
        calls, kept, pos = [], [], 0
        for m in _HERMES.finditer(text):
            parsed = _json_value(m.group(1))
            call = _make_call(parsed[0]) if parsed and not m.group(1)[parsed[1]:].strip() else None
            if call is None:
                continue
            calls.append(call)
            kept.append(text[pos:m.start()])
            pos = m.end()
        if calls:
            return ("".join(kept) + text[pos:]).strip(), calls

    at = text.find("[TOOL_CALLS]")
    if at >= 0:
        content = text[:at].strip()
        rest = text[at + len("[TOOL_CALLS]"):]
        parsed = _json_value(rest)
        if parsed and isinstance(parsed[0], list) and not rest[parsed[1]:].strip():
            calls = [_make_call(o, mistral=True) for o in parsed[0]]
            if calls and all(calls):
                return content, calls  # type: ignore[return-value]
        calls, pos = [], at
        while True:
            m = _MISTRAL_NAMED.match(text, pos)
            if not m:
                break
            args = _json_value(text, m.end())
            if args is None:
                break
            call = _make_call({"name": m.group(1), "arguments": args[0], "id": m.group(2)}, mistral=True)
            if call is None:
                break
            calls.append(call)
            pos = args[1]
            while pos < len(text) and text[pos].isspace():
                pos += 1
        if calls and pos >= len(text):
            return content, calls

    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if body.startswith(("{", "[")):
        calls, pos = [], 0
        while pos < len(body):
            parsed = _json_value(body, pos)
            if parsed is None:
                return text, []
            items = parsed[0] if isinstance(parsed[0], list) else [parsed[0]]
            for obj in items:
                if not isinstance(obj, dict) or ("parameters" not in obj and "arguments" not in obj):
                    return text, []
                call = _make_call(obj, names)
                if call is None:
                    return text, []
                calls.append(call)
            pos = parsed[1]
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
        if calls:
            return "", calls
    return text, []


_MARKERS = ("<tool_call>", "[TOOL_CALLS]")
_PYTHON_TAG = "<|python_tag|>"


class ContentStream:
    """The part of a reply with tools that can be shown as content while it is generated, in the
    formats `parse_tool_calls` reads: text up to a call's marker (`<tool_call>`, `[TOOL_CALLS]`, or
    the start of something that may be one), without its leading spaces and with its trailing ones held
    back (a reply with calls has its content stripped; the server strips the start of one without). A
    reply that opens as a call may (Llama 3's JSON, `[`, `<|python_tag|>`) is held whole. `add` gives
    each piece's part to send; `rest` what is left of the final content."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> str:
        self.text += piece
        end = self._shown()
        start = max(self.sent, len(self.text) - len(self.text.lstrip()))
        out = self.text[start:end] if end > start else ""
        self.sent = max(self.sent, end)
        return out

    def rest(self, content: str | None) -> str:
        """The part of `content` (the reply's, as `content` gives it) not sent yet."""
        sent = self.text[:self.sent].lstrip()
        body = (content or "").lstrip()
        return body[len(sent):] if body.startswith(sent) else ""

    def _shown(self) -> int:
        t = self.text
        s = t.lstrip()
        if not s or s.startswith(("{", "[")) or s.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(s):
            return 0
        end = len(t)
        for m in _MARKERS:
            at = t.find(m)
            if at >= 0:
                end = min(end, at)
            for k in range(min(len(m) - 1, len(t)), 0, -1):  # a marker's first characters at the end
                if t.endswith(m[:k]):
                    end = min(end, len(t) - k)
                    break
        while end > 0 and t[end - 1].isspace():
            end -= 1
        return end


_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def call_grammar(fmt: str, tools: list[dict], name: str | None = None, markers: dict[str, str] | None = None,
                 several: bool = False) -> str:
    """A Lark grammar (llguidance's: JSON schemas inline with %json) whose only sentences are one call
    (or with `several`, one or more: OpenAI's "required" with parallel_tool_calls),
    in the format `fmt` the model was shown ("hermes", "mistral", "mistral_args" or "llama3", as
    parse_tool_calls reads them), of the function `name`, or of any of `tools` (OpenAI's tool_choice
    "required"), with arguments that follow the function's parameters schema (each the root of its own
    %json, so that its "$ref"s resolve), with json.dumps' separators and no other whitespace (a
    model left free spends its tokens on newlines and indents). `markers`: the grammar
    text of a marker (`<tool_call>`, `[TOOL_CALLS]`, ...) where the vocabulary has it as one special
    token (`<[id]>`), which a quoted string never matches."""
    markers = markers or {}

    def lit(text: str) -> str:
        return markers.get(text) or json.dumps(text)

    args = "parameters" if fmt == "llama3" else "arguments"
    rules, alts = [], []
    for f in (t["function"] for t in validate_tools(tools) or ()):
        if name is not None and f["name"] != name:
            continue
        if not _NAME.fullmatch(f["name"]):
            raise UsageError(f"tool {f['name']!r:.80}: a call can be forced only for names of letters, digits, "
                             "'_', '.' and '-'")
        schema = dict(f.get("parameters") or {"type": "object"})
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError, RecursionError) as e:
            raise UsageError(f"tool {f['name']!r}: its parameters are not a JSON schema ({e})") from None
        i = len(alts)
        if fmt == "mistral_args":
            alts.append(f'{json.dumps(f["name"])} {lit("[ARGS]")} args_{i}')
        else:  # {"name": "f", "arguments": <args>}, as json.dumps writes it
            head = "{" + json.dumps("name") + ": " + json.dumps(f["name"]) + ", " + json.dumps(args) + ": "
            alts.append(f'{json.dumps(head)} args_{i} "}}"')
        rules.append(f"args_{i}: %json {text}")
    if not alts:
        raise UsageError(f"tool_choice names {name!r:.80}, which is not among the tools")
    one = {"hermes": f'{lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}',
           "mistral": 'call', "mistral_args": f'{lit("[TOOL_CALLS]")} call', "llama3": "call"}[fmt]
    more = {"hermes": '"\\n" one', "mistral": '", " one', "mistral_args": "one", "llama3": '"; " one'}[fmt]
    start = f"one ({more})*" if several else "one"
    if fmt == "mistral":
        start = f'{lit("[TOOL_CALLS]")} " [" {start} "]"'
    return "\n".join([f"start: {start}", f"one: {one}", "call: " + " | ".join(alts), *rules]) + "\n"
