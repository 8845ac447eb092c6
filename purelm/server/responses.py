"""OpenAI's Responses API (`POST /v1/responses`) over the chat route: a request's `input` items,
`instructions`, function `tools`, `text.format` and sampling fields are put in chat's terms (and
checked by the chat route's checks), and the reply comes back as a Response object, or streamed as
its typed events (`response.created`, `response.output_text.delta`, ..., `response.completed`).

Nothing is stored: `previous_response_id` is refused (send the whole conversation in `input`), and
`store` is answered false. Only function tools exist here; the hosted ones (web search, file search,
code interpreter, ...) are refused.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from . import protocol as P

# sampling fields passed on to the chat route as they are (llama.cpp's extras included)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "repeat_last_n", "logit_bias", "stop", "ignore_eos", "chat_template_kwargs", "grammar",
            *P.LLAMA_SAMPLING)
TEXT_PARTS = ("input_text", "output_text", "text")
ECHOED = ("instructions", "max_output_tokens", "parallel_tool_calls", "temperature", "top_p", "text", "tool_choice",
          "tools", "metadata")


def to_chat(body: dict) -> dict:
    """The chat-completions body a Responses request stands for (a 400 naming the field otherwise)."""
    metadata = P.get_dict(body, "metadata")
    if metadata is not None and (len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())):
        raise P.bad("metadata must be at most 16 string values", "metadata")
    if body.get("previous_response_id") is not None:
        raise P.bad("previous_response_id is not supported: this server stores no responses; send the whole "
                    "conversation in input", "previous_response_id", "unsupported")
    chat: dict[str, Any] = {k: body[k] for k in SAMPLING if k in body}
    chat["parallel_tool_calls"] = P.get_bool(body, "parallel_tool_calls", True)
    if "model" in body:
        chat["model"] = body["model"]
    limit = P.get_int(body, "max_output_tokens", 1, 2**62)
    if limit is not None:
        chat["max_completion_tokens"] = limit
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise P.bad("instructions must be a string", "instructions", "invalid_type")
        messages.append({"role": "system", "content": instructions})
    messages += _messages(body.get("input", P._MISSING))
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice = body["tool_choice"]
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        chat["tool_choice"] = choice
    fmt = (P.get_dict(body, "text") or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise P.bad('text.format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                        '"name": ..., "schema": ...}', "text.format")
        if fmt["type"] == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        elif fmt["type"] == "json_object":
            chat["response_format"] = {"type": "json_object"}
    return chat


def _messages(items: Any) -> list[dict]:
    if items is P._MISSING or items is None:
        raise P.bad("input is required (a string or an array of items)", "input", "missing_required_parameter")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise P.bad("input must be a string or a non-empty array of items", "input", "invalid_type")
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise P.bad(f"{where} must be an object", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": P.text_of(item.get("content"), where, TEXT_PARTS)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(v, str) for v in (call["id"], item.get("name"), item.get("arguments"))):
                raise P.bad(f"{where}: a function_call needs call_id, name and arguments (strings)", where)
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)  # the calls of one turn: one assistant message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise P.bad(f"{where}: a function_call_output needs call_id and output (strings)", where)
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": P.text_of(output, where, TEXT_PARTS)})
        elif kind == "reasoning":
            continue  # a reasoning model's summary: not shown to the model again
        else:
            raise P.bad(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                        "function_call_output)", where, "unsupported")
    return out


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise P.bad("tools must be an array", "tools", "invalid_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else P._kind(t)
            raise P.bad(f"tools[{i}]: tools of type {kind!r} are not supported (function tools only)", "tools",
                        "unsupported")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                      if k in t}})
    return out


def _echo(value: Any) -> Any:
    """A request's value as the reply repeats it: text that cannot be written as UTF-8 (a lone
    surrogate from a JSON escape) replaced, so that echoing it cannot fail."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_echo(v) for v in value]
    if isinstance(value, dict):
        return {_echo(k): _echo(v) for k, v in value.items()}
    return value


class Builder:
    """A Response object and its stream's events, for one request."""

    def __init__(self, body: dict, model: str) -> None:
        # the request's fields the reply repeats, made safe once (not the input: it is not repeated)
        self.body = {k: _echo(body[k]) for k in ECHOED if k in body}
        self.model = model
        self.id, self.created = f"resp_{uuid.uuid4().hex}", time.time()
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0

    def response(self, status: str, output: list[dict], usage: dict | None = None,
                 incomplete: str | None = None) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "model": self.model, "output": output, "parallel_tool_calls": b.get("parallel_tool_calls", True),
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": b.get("temperature"), "top_p": b.get("top_p"),
                "text": b.get("text") or {"format": {"type": "text"}}, "tool_choice": b.get("tool_choice", "auto"),
                "tools": b.get("tools") or [], "truncation": "disabled", "usage": usage,
                "metadata": b.get("metadata") or {}, "user": None}

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def function_call(call: dict) -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    def output(self, content: str | None, calls: list[dict] | None, status: str = "completed") -> list[dict]:
        items = [self.message(content, status)] if content else []
        return items + [self.function_call(c) for c in calls or []]

    @staticmethod
    def usage(n_prompt: int, n_generated: int) -> dict:
        return {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n_generated,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_prompt + n_generated}

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {text}\n\n".encode()
