"""Reading OpenAI-style request bodies: every field's type and range checked before use, and an
`APIError` (an OpenAI-style error body with its HTTP status) for anything wrong."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..sampling import MAX_BREAKER_BYTES, MAX_BREAKERS, SamplingParams

MAX_STOPS = 16
MAX_PROMPTS = 64  # prompts in one completions request
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_N_PROBS = 100  # llama.cpp's /completion: candidates listed per token
INT64 = 2**63


class APIError(Exception):
    """An error answer: `status` and OpenAI's error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error",
                             404: "invalid_request_error", 413: "invalid_request_error",
                             503: "unavailable_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def parse_json(raw: bytes) -> Any:
    """The body as JSON: 400 for invalid UTF-8 or JSON, and for NaN/Infinity (not JSON, though
    Python's parser takes them)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the body is not UTF-8: {e.reason} at byte {e.start}", code="invalid_json") from None

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=constant)
    except (ValueError, RecursionError) as e:
        msg = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise bad(f"the body is not valid JSON: {msg}", code="invalid_json") from None


def json_object(raw: bytes) -> dict:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, got {_kind(body)}", code="invalid_type")
    return body


def _kind(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


# -- fields
_MISSING = object()


def get_int(body: dict, name: str, lo: int, hi: int, default: Any = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {_kind(v)}", name, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"{name} must be between {lo} and {hi}, got {_short(v)}", name)
    return v


def get_float(body: dict, name: str, lo: float, hi: float, default: Any = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{name} must be a number, got {_kind(v)}", name, "invalid_type")
    if not _within(v, lo, hi):
        raise bad(f"{name} must be between {lo:g} and {hi:g}, got {_short(v)}", name)
    return float(v)


def _within(v: int | float, lo: float, hi: float) -> bool:
    """lo <= v <= hi for a finite v. An integer is compared as it is: JSON integers have any number of
    digits, and one past float's range would overflow a conversion (math.isfinite(10**400) raises)."""
    return (isinstance(v, int) or math.isfinite(v)) and lo <= v <= hi


def _short(v: Any) -> str:
    """A value for an error message: long integers by their size (repr would print every digit, or
    raise past Python's 4300)."""
    if isinstance(v, int) and abs(v) >= 10**30:
        return f"an integer of about {int(abs(v).bit_length() * 0.30103) + 1} digits"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {_kind(v)}", name, "invalid_type")
    return v


def get_str(body: dict, name: str, default: Any = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, str):
        raise bad(f"{name} must be a string, got {_kind(v)}", name, "invalid_type")
    return v


def get_dict(body: dict, name: str) -> dict | None:
    v = body.get(name)
    if v is not None and not isinstance(v, dict):
        raise bad(f"{name} must be an object, got {_kind(v)}", name, "invalid_type")
    return v


def check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return text


# -- the generation fields both routes share
@dataclass
class Generation:
    """The checked generation settings of a request."""

    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    grammar: str | None = None  # llguidance grammar
    extra: dict = field(default_factory=dict)
    lora: tuple[float, ...] | None = None  # the LoRA adapters' scales the request asks for (None: the server's)


# llama-server's sampling fields beyond OpenAI's (generation() reads them; the Responses and Messages
# routes pass them on)
LLAMA_SAMPLING = ("typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau",
                  "mirostat_eta", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                  "dry_sequence_breakers", "lora")

MAX_LORA_SCALE = 1e6


def lora_scales(value: Any, n_adapters: int, param: str = "lora") -> tuple[float, ...] | None:
    """llama-server's `lora`: [{"id": adapter index, "scale": number}, ...], the adapters left out at
    scale 0; None for an absent or empty list (the server's scales)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise bad(f"{param} must be an array of {{\"id\", \"scale\"}} objects, got {_kind(value)}", param,
                  "invalid_type")
    if not n_adapters:
        raise bad(f"{param}: this server has no LoRA adapters (start it with --lora)", param, "unsupported")
    scales = [0.0] * n_adapters
    for k, entry in enumerate(value):
        where = f"{param}[{k}]"
        if not isinstance(entry, dict) or "id" not in entry:  # (other keys, as GET /lora-adapters lists: ignored)
            raise bad(f"{where} must be an object with an \"id\" and a \"scale\", got {_short(entry)}", param,
                      "invalid_type")
        i, scale = entry["id"], entry.get("scale", 0.0)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_adapters:
            raise bad(f"{where}.id must be an adapter's index, 0 to {n_adapters - 1}, got {_short(i)}", param)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not _within(scale, -MAX_LORA_SCALE, MAX_LORA_SCALE):
            raise bad(f"{where}.scale must be a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, got "
                      f"{_short(scale)}", param)
        scales[i] = float(scale)
    return tuple(scales)


def _breakers(value: Any, default: Sequence[str]) -> Sequence[str]:
    """llama-server's dry_sequence_breakers: a non-empty array of strings."""
    if value is None:
        return default
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise bad(f"dry_sequence_breakers must be a non-empty array of strings, got {_kind(value)}",
                  "dry_sequence_breakers", "invalid_type")
    if len(value) > MAX_BREAKERS or not all(
            0 < len(check_text(t, "dry_sequence_breakers").encode()) <= MAX_BREAKER_BYTES for t in value):
        raise bad(f"dry_sequence_breakers takes at most {MAX_BREAKERS} strings of 1 to {MAX_BREAKER_BYTES} bytes "
                  "(UTF-8)", "dry_sequence_breakers")
    return tuple(value)


def generation(body: dict, n_vocab: int, n_ctx: int, max_n: int, chat: bool, echo: bool = False,
               defaults: SamplingParams | None = None, n_predict: int | None = None) -> Generation:
    """Sampling and stopping fields. Absent sampling fields take `defaults` (the server's, else llama.cpp's
    and `purelm generate`'s: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), an absent max_tokens
    `n_predict` (None: until the context is full). max_tokens may be 0 with `echo` (a completion that
    only scores its prompt)."""
    d = defaults or SamplingParams()
    seed = get_int(body, "seed", -INT64, 2**64 - 1)
    if seed is None:
        seed = d.seed
    elif seed < 0:
        if seed != -1:
            raise bad(f"seed must be >= 0, or -1 for a random one; got {seed}", "seed")
        seed = None
    params = SamplingParams(
        temperature=get_float(body, "temperature", 0.0, 2.0, d.temperature),
        top_k=get_int(body, "top_k", 0, 2**31 - 1, d.top_k),
        top_p=get_float(body, "top_p", 0.0, 1.0, d.top_p),
        min_p=get_float(body, "min_p", 0.0, 1.0, d.min_p),
        repeat_penalty=get_float(body, "repeat_penalty", 1e-3, 100.0, d.repeat_penalty),
        repeat_last_n=get_int(body, "repeat_last_n", -1, 2**31 - 1, d.repeat_last_n),
        frequency_penalty=get_float(body, "frequency_penalty", -2.0, 2.0, d.frequency_penalty),
        presence_penalty=get_float(body, "presence_penalty", -2.0, 2.0, d.presence_penalty),
        seed=seed,
        top_n_sigma=get_float(body, "top_n_sigma", -1e6, 1e6, d.top_n_sigma),
        typical_p=get_float(body, "typical_p", 0.0, 1.0, d.typical_p),
        xtc_probability=get_float(body, "xtc_probability", 0.0, 1.0, d.xtc_probability),
        xtc_threshold=get_float(body, "xtc_threshold", 0.0, 1.0, d.xtc_threshold),
        mirostat=get_int(body, "mirostat", 0, 2, d.mirostat),
        mirostat_tau=get_float(body, "mirostat_tau", 0.0, 1e6, d.mirostat_tau),
        mirostat_eta=get_float(body, "mirostat_eta", 0.0, 1e6, d.mirostat_eta),
        dry_multiplier=get_float(body, "dry_multiplier", 0.0, 1e6, d.dry_multiplier),
        dry_base=get_float(body, "dry_base", 1.0, 1e6, d.dry_base),
        dry_allowed_length=get_int(body, "dry_allowed_length", 0, 2**31 - 1, d.dry_allowed_length),
        dry_penalty_last_n=get_int(body, "dry_penalty_last_n", 0, 2**31 - 1, d.dry_penalty_last_n),
        dry_sequence_breakers=_breakers(body.get("dry_sequence_breakers"), d.dry_sequence_breakers))
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        v = get_int(body, name, 0 if echo else 1, 2**62)
        if v is not None and max_tokens is None:
            if v > n_ctx:
                raise bad(f"{name} = {v} is more than the context of {n_ctx} tokens", name,
                          "context_length_exceeded")
            max_tokens = v
    if max_tokens is None and n_predict is not None:
        max_tokens = min(n_predict, n_ctx)
    n = get_int(body, "n", 1, 2**62, 1)
    if n > max_n:
        raise bad(f"n = {n} is more than this server's {max_n} slots (--parallel)", "n")
    best_of = get_int(body, "best_of", 1, 2**62)
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (leave it out, or equal to n)", "best_of", "unsupported")

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or an array of strings, got {_kind(stop)}", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    stops = [check_text(s, "stop") for s in stops if s]

    stream = get_bool(body, "stream")
    opts = get_dict(body, "stream_options")
    if opts is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = get_bool(opts or {}, "include_usage")

    bias = get_dict(body, "logit_bias")
    logit_bias = None
    if bias:
        if len(bias) > MAX_LOGIT_BIAS:
            raise bad(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
        logit_bias = {}
        for k, v in bias.items():
            if not (k.isascii() and k.isdigit() and len(k) < 20) or int(k) >= n_vocab:  # (int() of 5000 digits raises)
                raise bad(f"logit_bias: {k!r} is not a token id (0 to {n_vocab - 1})", "logit_bias")
            if v is False:  # llama-server's way to ban a token
                v = -math.inf
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not _within(v, -100, 100):
                raise bad(f"logit_bias[{k}] must be a number between -100 and 100 (or false: never), got "
                          f"{_short(v)}", "logit_bias")
            logit_bias[int(k)] = float(v)
    params.logit_bias = logit_bias if body.get("logit_bias") is not None else d.logit_bias
    return Generation(params, max_tokens, n, stops, stream, include_usage, get_bool(body, "ignore_eos"))


def token_ids(v: Any, n_vocab: int, param: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise bad(f"{param} must be a non-empty array of token ids", param, "invalid_type")
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            raise bad(f"{param}: {_short(t)} is not a token id (0 to {n_vocab - 1})", param)
    return list(v)


def prompts(body: dict, n_vocab: int) -> list[str | list[int]]:
    """The completions route's `prompt`: a string, an array of strings, an array of token ids or an
    array of such arrays."""
    p = body.get("prompt", _MISSING)
    if p is _MISSING or p is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(p, str):
        return [check_text(p, "prompt")]
    if not isinstance(p, list) or not p:
        raise bad(f"prompt must be a string, an array of strings or an array of token ids, got {_kind(p)}"
                  + (" (empty)" if p == [] else ""), "prompt", "invalid_type")
    if len(p) > MAX_PROMPTS and not all(isinstance(t, int) for t in p):
        raise bad(f"prompt has {len(p)} prompts; at most {MAX_PROMPTS}", "prompt")
    if all(isinstance(t, str) for t in p):
        return [check_text(t, "prompt") for t in p]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [token_ids(p, n_vocab, "prompt")]
    if all(isinstance(t, list) for t in p):
        return [token_ids(t, n_vocab, "prompt") for t in p]
    raise bad("prompt must be a string, an array of strings, an array of token ids or an array of arrays "
              "of token ids (not a mix)", "prompt", "invalid_type")


ROLES = ("system", "developer", "user", "assistant", "tool")


def messages(body: dict) -> list[dict]:
    """The chat route's `messages`, checked, with content parts joined into one string."""
    msgs = body.get("messages", _MISSING)
    if msgs is _MISSING or msgs is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad(f"messages must be a non-empty array, got {_kind(msgs) if msgs != [] else 'an empty one'}",
                  "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object, got {_kind(m)}", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        msg: dict[str, Any] = {"role": role}
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else _kind(part)
                    raise bad(f"{where}.content[{j}]: only text parts are supported, got {kind!r}",
                              f"{where}.content", "unsupported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            if role != "assistant":
                raise bad(f"{where}.content is required", f"{where}.content", "missing_required_parameter")
        if content is not None and not isinstance(content, str):
            raise bad(f"{where}.content must be a string or an array of text parts, got {_kind(content)}",
                      f"{where}.content", "invalid_type")
        msg["content"] = check_text(content, f"{where}.content") if content is not None else None
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = check_text(get_str(m, key), f"{where}.{key}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise bad(f"{where}.tool_calls must be an array on an assistant message", f"{where}.tool_calls")
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                        not isinstance(f.get("arguments", ""), (str, dict)):
                    raise bad(f"{where}.tool_calls[{j}] must be {{type: function, function: {{name, arguments}}}}",
                              f"{where}.tool_calls", "invalid_type")
            msg["tool_calls"] = calls
        if msg.get("content") is None and role != "assistant":
            msg["content"] = ""
        out.append(msg)
    return out


def tools(body: dict) -> tuple[list[dict] | None, Any]:
    """`tools` (function tools only) and `tool_choice` ("none", "auto", "required" or a function)."""
    ts = body.get("tools")
    if ts is not None:
        if not isinstance(ts, list):
            raise bad(f"tools must be an array, got {_kind(ts)}", "tools", "invalid_type")
        for i, t in enumerate(ts):
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict) or \
                    not isinstance(f.get("name"), str) or not isinstance(f.get("parameters", {}), dict):
                raise bad(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}",
                          "tools", "invalid_type")
        ts = ts or None
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        raise bad("tool_choice must be \"none\", \"auto\", \"required\" or {type: function, function: {name}}",
                  "tool_choice")
    return ts, choice


def response_format(body: dict) -> tuple[str, Any] | None:
    """`response_format` (and llama.cpp's `json_schema` and `grammar`): None, or ("json_schema",
    schema) or ("gbnf", text)."""
    rf = get_dict(body, "response_format")
    if rf:
        kind = rf.get("type")
        if kind == "text":
            pass
        elif kind == "json_object":
            schema = rf.get("schema", {"type": "object"})  # llama.cpp takes a schema here too
            if not isinstance(schema, dict):
                raise bad("response_format.schema must be an object", "response_format")
            return "json_schema", schema
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                raise bad("response_format.json_schema must be an object {name, schema, strict}", "response_format")
            schema = js.get("schema", {})
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema.schema must be an object", "response_format")
            return "json_schema", schema
        else:
            raise bad(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                      "response_format")
    js = get_dict(body, "json_schema")
    if js is not None:
        return "json_schema", js
    grammar = get_str(body, "grammar")
    if grammar:
        return "gbnf", grammar
    return None


def text_of(content: Any, where: str, part_types: tuple[str, ...] = ("text",)) -> str:
    """A string, or an array of text parts of `part_types` joined (the Responses and Messages APIs'
    content); any other part is refused, naming `where`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in part_types and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad(f"{where}: parts of type {kind!r} are not supported here ({', '.join(part_types)})", where,
                          "unsupported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or an array of text parts", where, "invalid_type")

