"""Checking the messages and tools a conversation is given, and the tools polyfill: tool use written
into the text, in the Hermes / Qwen 2.5 format, for templates that know nothing of it."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import UsageError


def _check_text(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode: {e.reason} at index {e.start}") from None
    return text


def _content(content: Any, what: str) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts (joined by newlines, as
    llama.cpp joins them for templates that take strings)."""
    if isinstance(content, str):
        return _check_text(content, what)
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise UsageError(f"{what}[{j}] must be a dict like {{'type': 'text', 'text': ...}}, "
                                 f"got {type(part).__name__}")
            kind = part.get("type", "text")
            if kind != "text":
                raise UsageError(f"{what}[{j}] is of type {kind!r}; only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise UsageError(f"{what}[{j}]['text'] must be a str")
            texts.append(_check_text(part["text"], f"{what}[{j}]['text']"))
        return "\n".join(texts)
    raise UsageError(f"{what} must be a str or a list of text parts, got {type(content).__name__}")


def _tool_calls(calls: Any, what: str, object_arguments: bool = True) -> list[dict]:
    if not isinstance(calls, (list, tuple)):
        raise UsageError(f"{what} must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise UsageError(f"{what}[{j}] must be a dict like {{'type': 'function', 'function': "
                             f"{{'name': ..., 'arguments': ...}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            # OpenAI sends arguments as a JSON string; templates (Qwen's, Hermes', Llama 3.1's, Mistral's)
            # write them with |tojson and expect the object, as llama.cpp hands it to them.
            try:
                parsed = json.loads(args) if object_arguments else None
            except (ValueError, RecursionError):  # not JSON, or nested deeper than the stack: kept as text
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        elif not isinstance(args, Mapping):
            raise UsageError(f"{what}[{j}]['function']['arguments'] must be a JSON string or a dict")
        new = dict(call)
        new["type"] = call.get("type", "function")
        new["function"] = {**fn, "arguments": args}
        out.append(new)
    return out


def validate_messages(messages: Any, object_arguments: bool = True) -> list[dict]:
    """Checked copies of `messages` (a list of {'role': str, 'content': str | text parts | None, ...});
    a malformed one raises UsageError naming it. Text parts become one string; an assistant message
    with tool_calls may have no content (it becomes ''); with `object_arguments`, a tool call's
    arguments given as a JSON string of an object become that object."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise UsageError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        what = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise UsageError(f"{what} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise UsageError(f"{what}['role'] must be a non-empty str, got {role!r:.40}")
        new = {str(k): v for k, v in m.items()}
        calls = m.get("tool_calls")
        if calls is not None:
            new["tool_calls"] = _tool_calls(calls, f"{what}['tool_calls']", object_arguments)
        else:
            new.pop("tool_calls", None)
        content = m.get("content")
        if content is None:
            if not new.get("tool_calls"):
                raise UsageError(f"{what} has no content (only an assistant message with tool_calls may have none)")
            new["content"] = ""
        else:
            new["content"] = _content(content, f"{what}['content']")
        out.append(new)
    if not out:
        raise UsageError("messages is empty: give at least one message")
    return out


def validate_tools(tools: Any) -> list[dict] | None:
    """Checked copies of OpenAI-style tools ({'type': 'function', 'function': {'name': ..., ...}})."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise UsageError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or \
                tool.get("type", "function") != "function":
            raise UsageError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, "
                             f"'description': ..., 'parameters': {{...}}}}}}")
        try:  # templates and the tool-call grammar write them as JSON
            json.dumps(fn)
        except (TypeError, ValueError, RecursionError) as e:
            raise UsageError(f"tools[{i}] ({fn['name']!r:.80}) cannot be written as JSON: {e}") from None
        out.append({**tool, "type": "function", "function": dict(fn)})
    return out or None


# Tool use for templates that know nothing of it: the tools go into the system message and calls and
# results into the text, in the Hermes / Qwen 2.5 format (the system text is Qwen2.5-7B-Instruct's),
# which parse_tool_calls reads back. llama.cpp polyfills such templates the same way.
_TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def _polyfill_tools(messages: list[dict], tools: list[dict] | None, native_tools: bool, native_calls: bool,
                    native_role: bool) -> list[dict]:
    if tools and not native_tools:
        listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        text = _TOOLS_SYSTEM.format(tools=listing)
        if messages[0]["role"] == "system":
            messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
        else:
            messages = [{"role": "system", "content": text}] + messages
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls") and not native_calls:
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]},
                                                           ensure_ascii=False) + "\n</tool_call>"
                              for c in m["tool_calls"])
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m["content"] + "\n" if m["content"] else "") + calls
        if m["role"] == "tool" and not native_role:
            response = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
                continue
            m = {"role": "user", "content": response, "_tool_responses": True}
        out.append(m)
    for m in out:
        m.pop("_tool_responses", None)
    return out
