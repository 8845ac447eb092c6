"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the chat
route, as llama-server offers it: `system`, `messages` of text, `tool_use` and `tool_result` blocks,
`tools` with an `input_schema`, `tool_choice`, `stop_sequences`, `max_tokens`; the reply as a message
of `text` and `tool_use` blocks with Anthropic's `stop_reason`, or streamed as its events
(`message_start`, `content_block_delta`, ..., `message_stop`). Images, documents and server tools
are refused; thinking blocks are dropped.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from . import protocol as P

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stream", "grammar", *P.LLAMA_SAMPLING)
CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def to_chat(body: dict, count_only: bool = False) -> dict:
    """The chat-completions body a Messages request stands for (a 400 naming the field otherwise).
    `count_only`: for count_tokens, where max_tokens is not asked for."""
    chat: dict[str, Any] = {k: body[k] for k in SAMPLING if k in body}
    if "model" in body:
        chat["model"] = body["model"]
    limit = P.get_int(body, "max_tokens", 1, 2**62)
    if limit is None and not count_only:
        raise P.bad("max_tokens is required", "max_tokens", "missing_required_parameter")
    if limit is not None:
        chat["max_tokens"] = limit
    stops = body.get("stop_sequences")
    if stops is not None:
        chat["stop"] = stops
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": P.text_of(system, "system")})
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise P.bad("messages must be a non-empty array", "messages",
                    "missing_required_parameter" if items is None else "invalid_type")
    for i, m in enumerate(items):
        messages += _message(m, f"messages[{i}]")
    chat["messages"] = messages
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool" and isinstance(choice.get("name"), str):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in CHOICES:
            chat["tool_choice"] = CHOICES[kind]
        else:
            raise P.bad('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or {"type": "tool", '
                        '"name": ...}', "tool_choice")
        chat["parallel_tool_calls"] = not P.get_bool(choice, "disable_parallel_tool_use")
    return chat


def _message(m: Any, where: str) -> list[dict]:
    """One Messages-API message as chat messages: a user turn's tool results become tool messages
    (before its text), an assistant turn's tool_use blocks its tool calls."""
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise P.bad(f"{where} must be an object with role \"user\" or \"assistant\"", where, "invalid_type")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise P.bad(f"{where}.content must be a string or an array of blocks", where, "invalid_type")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input"), dict):
                raise P.bad(f"{at}: a tool_use block needs id, name (strings) and input (an object)", at)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise P.bad(f"{at}: a tool_result block needs tool_use_id (a string)", at)
            text = P.text_of(block.get("content", ""), at)
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise P.bad(f"{at}: blocks of type {kind!r} are not supported in a {role} message", at, "unsupported")
    out = results
    if calls:
        out.append({"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls})
    elif texts or not results:
        out.append({"role": role, "content": "".join(texts)})
    return out


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise P.bad("tools must be an array", "tools", "invalid_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom" or not isinstance(t.get("name"), str):
            raise P.bad(f"tools[{i}]: only client tools are supported ({{name, description, input_schema}})",
                        "tools", "unsupported")
        fn = {"name": t["name"], "parameters": t.get("input_schema", {"type": "object"})}
        if "description" in t:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def content_blocks(text: str | None, calls: list[dict] | None) -> list[dict]:
    """A reply's blocks: its text, then a tool_use block per call (arguments that are no JSON object
    come as {})."""
    blocks: list[dict] = [{"type": "text", "text": text}] if text else []
    for call in calls or []:
        try:
            args = json.loads(call["function"]["arguments"])
        except (ValueError, RecursionError):
            args = {}
        blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                       "name": call["function"]["name"], "input": args if isinstance(args, dict) else {}})
    return blocks


def stop_reason(finish_reason: str | None, stop: str | None, calls: list[dict] | None) -> str:
    if calls:
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop else "end_turn"


def message(model: str, blocks: list[dict], reason: str | None, stop: str | None, n_in: int, n_out: int,
            message_id: str) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": reason, "stop_sequence": stop,
            "usage": {"input_tokens": n_in, "output_tokens": n_out}}


def event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **fields}, ensure_ascii=False,
                                                          separators=(",", ":")).encode() + b"\n\n"
