"""`purelm serve` against the SmolLM2 file, driven by the official `openai` client (and httpx for what
the client will not send): chat and completions, streaming and not, n=2, logprobs, echo, JSON-schema
output, tool calls, the Responses and Messages APIs; fill in the middle; memory shared by requests; 32
concurrent streaming clients each getting the reply the same prompt gets alone; a client that leaves
mid-stream freeing its slot; 4xx answers with OpenAI's error body for bad requests; llama.cpp's routes;
embeddings equal to `LLM.embed`; the queue limit, the API key, an engine step that fails. The server
runs in-process (uvicorn in a thread) on a free loopback port."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import purelm  # noqa: E402
from purelm.sampling import Sampler, SamplingParams  # noqa: E402
from purelm.server import ServerConfig, create_app  # noqa: E402
from purelm.server import protocol as P  # noqa: E402
from conftest import LLAMA_CPP  # noqa: E402

N_CTX = 512
ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct.Q4_1"


class Server:
    def __init__(self, llm, config: ServerConfig) -> None:
        import uvicorn

        self.llm = llm
        self.app = create_app(llm, config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 30 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.state = self.app.state.purelm
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, path, body=None, **kw):
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        return httpx.post(self.base + path, content=body, headers={"content-type": "application/json"},
                          timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server did not stop: a request is still open"


@pytest.fixture(scope="module")
def srv(smollm2_path):
    s = Server(purelm.load(smollm2_path, n_ctx=N_CTX), ServerConfig(parallel=8, max_queue=64))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref(smollm2_path):
    """A second copy of the model for references (the server's copy belongs to its engine thread)."""
    return purelm.load(smollm2_path, n_ctx=N_CTX)


def wait_idle(srv, timeout=20):
    t0 = time.monotonic()
    while srv.state.engine.slots_used or srv.state.engine.n_waiting:
        assert time.monotonic() - t0 < timeout, "slots were not freed"
        time.sleep(0.02)


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# ------------------------------------------------------------------------------ completions and chat
def test_completion_greedy_equals_generate_streaming_or_not(srv, ref):
    prompt = "The capital of France is"
    want = ref.generate(prompt, max_tokens=12, temperature=0)
    r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.tokenize(prompt)) and r.usage.completion_tokens == 12
    assert r.model == MODEL and r.object == "text_completion"
    events = list(srv.client.completions.create(model=MODEL + ".gguf", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == want
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 12 and not events[-1].choices


def test_completion_prompts_as_token_ids_and_several_prompts(srv, ref):
    a, b = ref.tokenize("Once upon a time"), ref.tokenize("def fib(n):")
    r = srv.client.completions.create(model=MODEL, prompt=[a, b], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [ref.generate(a, max_tokens=6, temperature=0),
                                           ref.generate(b, max_tokens=6, temperature=0)]
    assert r.usage.prompt_tokens == len(a) + len(b)


def test_n2_samples_are_seeded_and_differ(srv, ref):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=10, temperature=1.0, seed=7, n=2)
    r1 = srv.client.completions.create(**kw)
    r2 = srv.client.completions.create(**kw)
    texts = [c.text for c in r1.choices]
    assert texts == [c.text for c in r2.choices] and len(texts) == 2 and texts[0] != texts[1]
    # sample j uses seed + j, as generate_batch does
    assert texts == [c.text for c in ref.generate_batch(["My favourite animal is"], n=2, max_tokens=10,
                                                        temperature=1.0, seed=7)]
    chat = srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                              max_tokens=8, n=2, seed=3, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)


def test_llama_cpps_other_sampler_fields_reach_the_sampler(srv, ref):
    """mirostat, typical_p, top_n_sigma, XTC's and DRY's fields (llama-server's names): the API's text
    for the same seed, on the OpenAI route and llama.cpp's /completion."""
    prompt, kw = "My favourite animal is", dict(max_tokens=10, temperature=1.0, seed=7)
    plain = srv.client.completions.create(model=MODEL, prompt=prompt, **kw).choices[0].text
    for extra in [dict(mirostat=2, mirostat_tau=2.0, mirostat_eta=0.3), dict(mirostat=1),
                  dict(typical_p=0.4, top_n_sigma=1.5, xtc_probability=1.0, xtc_threshold=0.05),
                  dict(dry_multiplier=5.0, dry_base=3.0, dry_allowed_length=0, dry_sequence_breakers=["\n"])]:
        want = ref.generate_batch([prompt], n=1, **kw, **extra)[0].text
        got = srv.client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **kw).choices[0].text
        r = httpx.post(srv.base + "/completion", json={"prompt": prompt, "n_predict": 10, "temperature": 1.0,
                                                       "seed": 7, **extra}, timeout=60)
        assert got == want == r.json()["content"] and want != plain, extra
    for field, value in [("mirostat", 3), ("dry_sequence_breakers", []), ("dry_sequence_breakers", ["x" * 41]),
                         ("dry_base", 0.5), ("dry_penalty_last_n", -1)]:
        r = httpx.post(srv.base + "/v1/completions", json={"prompt": prompt, field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value)


def test_chat_streaming_and_not(srv, ref):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    want = ref.chat(msgs, max_tokens=24, temperature=0).content
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and "Paris" in want
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_logprobs_chat_and_legacy(srv):
    r = srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count: 1, 2,"}],
                                           max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)
    c = srv.client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    # streamed: the same entries, piece by piece
    s = srv.client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2,
                                      stream=True)
    toks = [t for e in s for t in (e.choices[0].logprobs.tokens if e.choices[0].logprobs else [])]
    assert toks == lp.tokens


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True))


def test_echo_scores_the_prompt_as_llm_logits(srv, ref):
    """echo (lm-evaluation-harness's loglikelihood requests: echo, logprobs, max_tokens 0 or 1): each
    choice's text starts with its prompt, and its logprobs with the prompt tokens' ones (the first
    None), those LLM.logits gives; a 300-token prompt goes in several chunks. Streamed, the same."""
    long_ids = ref.tokenize((ROOT / "README.md").read_text()[:1500])[:300]
    text = ref.detokenize(long_ids)
    short = "The capital of France is"
    r = srv.client.completions.create(model=MODEL, prompt=[short, text], max_tokens=2, temperature=0, echo=True,
                                      logprobs=2, n=2)
    assert len(r.choices) == 4 and r.usage.completion_tokens == 8
    logprobs = {p: _log_softmax(ref.logits(ref.tokenize(p))) for p in (short, text)}
    for i, c in enumerate(r.choices):
        prompt = [short, text][i // 2]
        ids = ref.tokenize(prompt)
        assert c.text == prompt + ref.generate(prompt, max_tokens=2, temperature=0)
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 2
        assert lp.tokens[:len(ids)] == [ref.tokenizer.token_to_piece(t).decode("utf-8", "replace") for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = logprobs[prompt]
        got = np.array(lp.token_logprobs[1:len(ids)])
        np.testing.assert_allclose(got, want[np.arange(len(ids) - 1), ids[1:]], atol=2e-3)
        for j in range(1, len(ids)):  # the likeliest two, the chosen token's own value where it is one of them
            assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(np.sort(want[j - 1])[::-1][:2],
                                                                                      abs=2e-3)
        assert lp.text_offset[len(ids)] == len(prompt)
        assert [c.text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:])] == lp.tokens[:-1]
    # lm-evaluation-harness's request: token ids, max_tokens 1, the continuation's logprobs at [ctxlen:-1]
    ctx, cont = long_ids[:200], long_ids[200:]
    e = srv.post("/v1/completions", {"prompt": long_ids, "max_tokens": 1, "temperature": 0, "echo": True,
                                     "logprobs": 1}).json()["choices"][0]
    want = logprobs[text] if ref.tokenize(text) == long_ids else _log_softmax(ref.logits(long_ids))
    scores = e["logprobs"]["token_logprobs"][len(ctx):-1]
    np.testing.assert_allclose(scores, want[np.arange(199, 299), cont], atol=2e-3)
    assert e["text"].startswith(ref.detokenize(long_ids))
    # max_tokens 0: the prompt alone; streamed, one event with the prompt, then the pieces
    z = srv.client.completions.create(model=MODEL, prompt=short, max_tokens=0, echo=True, logprobs=0)
    assert z.choices[0].text == short and z.usage.completion_tokens == 0 and z.choices[0].finish_reason == "length"
    assert z.choices[0].logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs[:len(ref.tokenize(short))]
    for k in (None, 2):
        events = list(srv.client.completions.create(model=MODEL, prompt=short, max_tokens=2, temperature=0,
                                                    echo=True, logprobs=k, stream=True))
        assert events[0].choices[0].text == short and "".join(e.choices[0].text for e in events) == r.choices[0].text
        if k:
            got = [v for e in events for v in e.choices[0].logprobs.token_logprobs]
            assert got == r.choices[0].logprobs.token_logprobs
            assert [v for e in events for v in e.choices[0].logprobs.text_offset] == r.choices[0].logprobs.text_offset
    assert error_of(srv.post("/v1/completions", {"prompt": short, "max_tokens": 0}), 400)["param"] == "max_tokens"


def test_json_schema_response_parses_and_validates(srv):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=60,
        temperature=0.7, seed=1, response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                                          "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)
    assert 0 <= obj["age"] <= 150 and len(obj["name"]) <= 20 and r.choices[0].finish_reason == "stop"
    r = srv.client.completions.create(model=MODEL, prompt="A JSON object:", max_tokens=40, temperature=0,
                                      extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)
    # ignore_eos would run past the grammar's end: the reply ends there all the same
    r = srv.client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0,
                                      extra_body={"grammar": 'root ::= "a" "b"', "ignore_eos": True})
    assert r.choices[0].text == "ab" and r.choices[0].finish_reason == "stop"
    err = error_of(srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "response_format": {"type": "json_schema", "json_schema": {
                                                         "name": "x", "schema": {"type": "nonsense"}}}}), 400)
    assert err["param"] == "response_format"


def test_tool_calls_are_parsed_from_the_reply(srv):
    pytest.importorskip("llguidance")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>'
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                max_tokens=60, temperature=0, extra_body={"grammar": f'root ::= "{call}"'})
    r = srv.client.chat.completions.create(**body)
    msg = r.choices[0]
    assert msg.finish_reason == "tool_calls" and not msg.message.content
    assert msg.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    chunks = list(srv.client.chat.completions.create(stream=True, **body))
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].index == 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_parallel_tool_calls_false_keeps_a_replys_first_call(srv):
    """A reply with two calls gives both; with parallel_tool_calls false (the Responses API's too,
    Anthropic's disable_parallel_tool_use) only the first."""
    pytest.importorskip("llguidance")
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    one = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"%s\\"}}\\n</tool_call>'
    grammar = f'root ::= "{one % "Paris"}\\n{one % "Rome"}"'
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    body = dict(model=MODEL, messages=msgs, tools=[{"type": "function", "function": fn}], max_tokens=80,
                temperature=0)
    for parallel, cities in ((None, ["Paris", "Rome"]), (False, ["Paris"])):  # (streamed: the same _ChatTurn)
        extra = {"grammar": grammar} | ({} if parallel is None else {"parallel_tool_calls": parallel})
        calls = [t.function for t in
                 srv.client.chat.completions.create(extra_body=extra, **body).choices[0].message.tool_calls]
        assert [json.loads(f.arguments)["city"] for f in calls] == cities, parallel
    out = srv.post("/v1/responses", {"input": msgs[0]["content"], "tools": [{"type": "function", **fn}],
                                     "max_output_tokens": 80, "temperature": 0, "grammar": grammar,
                                     "parallel_tool_calls": False}).json()
    assert [o["type"] for o in out["output"]].count("function_call") == 1 and out["parallel_tool_calls"] is False
    m = srv.post("/v1/messages", {"messages": msgs, "max_tokens": 80, "temperature": 0, "grammar": grammar,
                                  "tools": [{"name": fn["name"], "input_schema": fn["parameters"]}],
                                  "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}).json()
    assert [c["type"] for c in m["content"]].count("tool_use") == 1, m


_TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {
                                             "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
                                             "additionalProperties": False}}}
_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}


def test_tool_choice_required_or_named_makes_the_reply_a_call(srv):
    """tool_choice "required" or a named function: a grammar lets the reply be only a call (of that
    function), its arguments following the parameters' schema, on the chat, Responses and Messages
    routes; requests that cannot be forced get a 400 naming the field."""
    pytest.importorskip("llguidance")
    msgs = [{"role": "user", "content": "Hello! How are you today?"}]  # a question no tool answers
    base = dict(model=MODEL, messages=msgs, tools=[_WEATHER, _TIME], max_tokens=60, temperature=0)
    free = srv.client.chat.completions.create(**base).choices[0]
    assert free.finish_reason != "tool_calls"  # left free, this model answers in words
    named = srv.client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_time"}},
                                               **base).choices[0]
    assert named.finish_reason == "tool_calls" and [t.function.name for t in named.message.tool_calls] == ["get_time"]
    assert json.loads(named.message.tool_calls[0].function.arguments)["tz"] in ("UTC", "CET")
    required = srv.client.chat.completions.create(tool_choice="required", **base).choices[0]
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    call = required.message.tool_calls[0].function
    assert call.name in ("get_weather", "get_time") and isinstance(json.loads(call.arguments), dict)
    # "required" lets the reply hold several calls unless parallel_tool_calls is false: with the end of the
    # turn all but banned, the model goes on with another call where it may, and ends after one where not
    ban = {str(t): -100 for t in {*srv.llm.tokenizer.eog_ids, *srv.state.template.stop_token_ids}}
    several = srv.client.chat.completions.create(tool_choice="required", logit_bias=ban,
                                                 **{**base, "max_tokens": 90}).choices[0]
    assert len(several.message.tool_calls) >= 2
    one = srv.client.chat.completions.create(tool_choice="required", logit_bias=ban, parallel_tool_calls=False,
                                             **{**base, "max_tokens": 90}).choices[0]
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1
    streamed = [c.choices[0] for c in srv.client.chat.completions.create(
        stream=True, tool_choice={"type": "function", "function": {"name": "get_time"}}, **base) if c.choices]
    assert [t.function.name for c in streamed for t in c.delta.tool_calls or []] == ["get_time"]

    r = srv.client.responses.create(model=MODEL, input=msgs[0]["content"], max_output_tokens=60, temperature=0,
                                    tools=[{"type": "function", **_TIME["function"]}],
                                    tool_choice={"type": "function", "name": "get_time"})
    assert [(o.type, o.name) for o in r.output] == [("function_call", "get_time")]
    m = srv.post("/v1/messages", {"messages": msgs, "max_tokens": 60, "temperature": 0,
                                  "tools": [{"name": "get_time", "input_schema": _TIME["function"]["parameters"]}],
                                  "tool_choice": {"type": "tool", "name": "get_time"}}).json()
    assert m["stop_reason"] == "tool_use" and [b["type"] for b in m["content"]] == ["tool_use"]
    assert m["content"][0]["input"]["tz"] in ("UTC", "CET")

    plain = {"messages": msgs, "max_tokens": 4}
    for body, param in [({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [_TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tools": [_TIME], "tool_choice": "required", "response_format": {"type": "json_object"}},
                         "tool_choice"),
                        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                          "tool_choice": "required"}, "tools")]:
        assert error_of(srv.post("/v1/chat/completions", {**plain, **body}), 400)["param"] == param, body


def test_the_forced_call_grammar_takes_each_format_parse_tool_calls_reads(srv):
    """call_grammar in each format: a call of the named function, written as parse_tool_calls reads
    that format, is a whole sentence of it; another function's call, or text first, is not."""
    llguidance = pytest.importorskip("llguidance")
    from purelm.chat import ChatTemplate
    from purelm.chat.tool_calls import call_grammar, parse_tool_calls

    from purelm.grammar import grammar_tokenizer

    tok = grammar_tokenizer(srv.llm.tokenizer)
    calls = {"hermes": '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
             "mistral": '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]',
             "llama3": '{"name": "get_time", "parameters": {"tz": "CET"}}'}

    def accepts(grammar: str, text: str) -> bool:
        m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(grammar))
        return m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()

    for fmt, text in calls.items():
        assert parse_tool_calls(text, [_TIME])[1][0]["function"]["name"] == "get_time"
        assert accepts(call_grammar(fmt, [_WEATHER, _TIME], "get_time"), text), fmt
        assert accepts(call_grammar(fmt, [_WEATHER, _TIME]), text), fmt
        assert not accepts(call_grammar(fmt, [_WEATHER, _TIME], "get_weather"), text), fmt
        assert not accepts(call_grammar(fmt, [_TIME]), text.replace('"CET"', '"EST"')), fmt  # not in the enum
        assert not accepts(call_grammar(fmt, [_TIME]), "Sure. " + text), fmt
        two = {"hermes": text + "\n" + text, "mistral": text[:-1] + ", " + text[len("[TOOL_CALLS] ["):],
               "llama3": text + "; " + text}[fmt]
        assert len(parse_tool_calls(two, [_TIME])[1]) == 2
        assert accepts(call_grammar(fmt, [_WEATHER, _TIME], several=True), two), fmt
        assert accepts(call_grammar(fmt, [_WEATHER, _TIME], several=True), text), fmt
        assert not accepts(call_grammar(fmt, [_WEATHER, _TIME]), two), fmt
    args = '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
    assert len(parse_tool_calls(args + args, [_TIME])[1]) == 2
    assert accepts(call_grammar("mistral_args", [_TIME], several=True), args + args)
    assert not accepts(call_grammar("mistral_args", [_TIME]), args + args)
    assert ChatTemplate.builtin("chatml").call_format == "hermes"  # purelm's polyfill shows Hermes' format
    assert ChatTemplate.builtin("mistral").call_format == "mistral"
    llama31 = ("{% if tools %}Use a tool as {\"name\": function name, \"parameters\": ...}{% endif %}"
               "<|start_header_id|>user<|end_header_id|>{{ messages[0].content }}<|eot_id|>")
    assert ChatTemplate(llama31).call_format == "llama3"


@pytest.mark.parametrize("lead", ["Let me look that up for you now.", "It is sunny there, as it was all week."])
def test_a_reply_with_tools_streams_its_text_before_a_call(srv, lead):
    """With tools, the text before a tool call (or a whole reply without one) streams as it comes, on
    the chat, Responses and Messages routes; what was streamed adds up to the reply given whole."""
    pytest.importorskip("llguidance")
    call = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>'
    with_call = lead.startswith("Let")
    grammar = f'root ::= "{lead}\\n{call}"' if with_call else f'root ::= "{lead}"'
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    body = dict(model=MODEL, messages=msgs, tools=[{"type": "function", "function": fn}], max_tokens=80,
                temperature=0, extra_body={"grammar": grammar})
    whole = srv.client.chat.completions.create(**body).choices[0]
    assert whole.message.content == lead and bool(whole.message.tool_calls) == with_call
    chunks = [c.choices[0] for c in srv.client.chat.completions.create(stream=True, **body) if c.choices]
    early = [c.delta.content for c in chunks if c.delta.content and not c.finish_reason]
    assert len(early) >= 3, early  # in pieces as generated, not in one chunk at the end
    assert "".join(c.delta.content or "" for c in chunks) == lead
    assert [t.function.name for c in chunks for t in c.delta.tool_calls or []] == ["get_weather"] * with_call
    assert chunks[-1].finish_reason == ("tool_calls" if with_call else "stop")

    ask = {"input": "Weather in Paris?", "tools": [{"type": "function", **fn}], "max_output_tokens": 80,
           "temperature": 0, "grammar": grammar, "stream": True}
    events = _sse_events(srv.post("/v1/responses", ask).text)
    deltas = [e["delta"] for k, e in events if k == "response.output_text.delta"]
    assert len(deltas) >= 3 and "".join(deltas) == lead
    done = events[-1][1]["response"]["output"]
    assert [o["type"] for o in done] == ["message"] + ["function_call"] * with_call
    ask = {"messages": msgs, "max_tokens": 80, "temperature": 0, "grammar": grammar, "stream": True,
           "tools": [{"name": fn["name"], "input_schema": fn["parameters"]}]}
    events = _sse_events(srv.post("/v1/messages", ask).text)
    deltas = [e["delta"]["text"] for k, e in events if k == "content_block_delta" and e["index"] == 0]
    assert len(deltas) >= 3 and "".join(deltas) == lead
    starts = [e["content_block"]["type"] for k, e in events if k == "content_block_start"]
    assert starts == ["text"] + ["tool_use"] * with_call


def test_responses_api_replies_as_chat(srv):
    """/v1/responses through the official client: the reply chat gives the same messages (instructions
    as the system message, input items as messages), streamed events that the client's stream helper
    accumulates into the same response, function calls out and their outputs back in."""
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hi"}]
    chat = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0)
    r = srv.client.responses.create(model=MODEL, instructions="Answer briefly.", input="Say hi",
                                    max_output_tokens=64, temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.status == "completed"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    with srv.client.responses.stream(model=MODEL, instructions="Answer briefly.", max_output_tokens=64,
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}],
                                     temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == r.output_text and final.status == "completed"
    short = srv.client.responses.create(model=MODEL, input="Say hi", max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.output[0].status == "incomplete"
    for stream in ("false", "true"):  # fields repeated in the reply, with text JSON allows and UTF-8 does not
        r = srv.post("/v1/responses", '{"input": "hi", "max_output_tokens": 2, "metadata": {"k": "\\ud800"}, '
                                      f'"text": {{"format": {{"type": "text", "x": "\\ud800"}}}}, "stream": {stream}}}')
        assert r.status_code == 200 and "response.incomplete" in r.text if stream == "true" else r.json()["metadata"]

    pytest.importorskip("llguidance")
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    call = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>'
    r = srv.client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools, max_output_tokens=60,
                                    temperature=0, extra_body={"grammar": f'root ::= "{call}"'})
    (fc,) = r.output
    assert fc.type == "function_call" and fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
             {"type": "function_call_output", "call_id": fc.call_id, "output": "Sunny, 24 C"}]
    after = srv.client.responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=24, temperature=0)
    chat = srv.client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, tools=[
        {"type": "function", "function": {k: v for k, v in tools[0].items() if k != "type"}}], messages=[
        items[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": fc.call_id, "type": "function", "function": {"name": fc.name, "arguments": fc.arguments}}]},
        {"role": "tool", "tool_call_id": fc.call_id, "content": "Sunny, 24 C"}])
    assert after.output_text == chat.choices[0].message.content
    for body, param in [({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"), ({}, "input"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "input[0]")]:
        assert error_of(srv.post("/v1/responses", body), 400)["param"] == param


def _sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        head, data = block.split("\n", 1)
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_messages_api_replies_as_chat(srv):
    """/v1/messages (Anthropic's API, as llama-server offers it): the reply chat gives the same
    conversation, streamed as Anthropic's events, its stop reasons, tool_use blocks out and
    tool_result blocks back in, count_tokens equal to the reply's input_tokens."""
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hi"}]
    chat = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0)
    body = {"model": MODEL, "max_tokens": 64, "temperature": 0, "system": [{"type": "text", "text": "Answer briefly."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]}
    m = srv.post("/v1/messages", body).json()
    assert m["type"] == "message" and m["role"] == "assistant" and m["content"][0]["text"] == chat.choices[0].message.content
    assert m["stop_reason"] == {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert m["usage"] == {"input_tokens": chat.usage.prompt_tokens, "output_tokens": chat.usage.completion_tokens}
    assert srv.post("/v1/messages/count_tokens", {k: v for k, v in body.items() if k != "max_tokens"}).json() \
        == {"input_tokens": chat.usage.prompt_tokens}
    events = _sse_events(srv.post("/v1/messages", {**body, "stream": True}).text)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == ["content_block_stop",
                                                                                    "message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for k, e in events if k == "content_block_delta") == m["content"][0]["text"]
    assert events[-2][1]["delta"]["stop_reason"] == m["stop_reason"]
    cut = m["content"][0]["text"][:4]
    stopped = srv.post("/v1/messages", {**body, "stop_sequences": ["zzz", cut]}).json()
    assert (stopped["content"], stopped["stop_reason"], stopped["stop_sequence"]) == ([], "stop_sequence", cut)

    pytest.importorskip("llguidance")
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    call = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>'
    ask = {"model": MODEL, "max_tokens": 60, "temperature": 0, "tools": tools,
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    used = srv.post("/v1/messages", {**ask, "grammar": f'root ::= "{call}"'}).json()
    (block,) = used["content"]
    assert used["stop_reason"] == "tool_use" and block["type"] == "tool_use"
    assert block["name"] == "get_weather" and block["input"] == {"city": "Paris"}
    streamed = _sse_events(srv.post("/v1/messages", {**ask, "grammar": f'root ::= "{call}"', "stream": True}).text)
    starts = [e["content_block"] for k, e in streamed if k == "content_block_start"]
    assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "get_weather"
    assert json.loads("".join(e["delta"]["partial_json"] for k, e in streamed if k == "content_block_delta")) \
        == {"city": "Paris"}
    after = srv.post("/v1/messages", {**ask, "max_tokens": 24, "messages": [
        ask["messages"][0], {"role": "assistant", "content": [block]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "Sunny, 24 C"}]}]}).json()
    chat = srv.client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, tools=[
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                          "parameters": tools[0]["input_schema"]}}], messages=[
        ask["messages"][0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": block["id"], "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": block["id"], "content": "Sunny, 24 C"}])
    assert after["content"][0]["text"] == chat.choices[0].message.content
    for bad, param in [({**body, "max_tokens": None}, "max_tokens"),
                       ({**body, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                        "messages[0].content[0]"), ({**body, "tools": [{"type": "web_search_20250305"}]}, "tools")]:
        assert error_of(srv.post("/v1/messages", {k: v for k, v in bad.items() if v is not None}), 400)["param"] == param


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ raise_exception('roles must alternate') }}",
])
def test_a_hostile_or_failing_template_gets_a_clear_error(srv, source):
    from purelm.chat import ChatTemplate

    old = srv.state._template
    srv.state._template = ChatTemplate(source, tokenizer=srv.llm.tokenizer)
    try:
        err = error_of(srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400)
        assert err["code"] == "template_error" and "chat template" in err["message"]
    finally:
        srv.state._template = old
    r = srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.role == "assistant"


# ------------------------------------------------------------------------------ many clients at once
def test_32_concurrent_streaming_clients_get_their_own_replies(srv, ref):
    prompts = [f"Item {i}: the {w} is" for i, w in enumerate(
        ["sky", "sea", "cat", "dog", "sun", "moon", "tree", "road"] * 4)]
    want = [ref.generate(p, max_tokens=8, temperature=0, ignore_eos=True) for p in prompts]
    client = openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(p):
        s = await client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        return "".join([e.choices[0].text async for e in s])

    async def main():
        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            await client.close()

    got = asyncio.run(main())
    assert got == want
    wait_idle(srv)


def test_a_client_that_leaves_frees_its_slot(srv):
    wait_idle(srv)
    body = {"prompt": "Tell me a very long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=srv.base, timeout=60) as c:
        streams = []
        for _ in range(8):  # every slot
            s = c.stream("POST", "/v1/completions", json=body)
            r = s.__enter__()
            streams.append((s, r.iter_lines()))
        for _, lines in streams:  # each has started generating
            assert next(line for line in lines if line.startswith("data: "))
        assert srv.state.engine.slots_used == 8
        for s, _ in streams:
            s.__exit__(None, None, None)
    t0 = time.monotonic()
    r = srv.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 15  # 8 x 400 tokens would take minutes
    wait_idle(srv)
    # a non-streaming client that gives up: its request is dropped too
    before = srv.state.engine.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base + "/v1/completions", json={**body, "stream": False, "max_tokens": 480}, timeout=0.5)
    wait_idle(srv, timeout=5)
    assert srv.state.engine.tokens_generated - before < 480
    assert srv.client.models.list().data[0].id == MODEL  # and it keeps serving


# ------------------------------------------------------------------------------ bad requests
BAD = [
    ("/v1/chat/completions", b"{", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_type"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400, "invalid_value"),
    ("/v1/completions", b"\xff\xfe", 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"1": -1' + b"0" * 400 + b"}}", 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1" * 5000: 1}}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3.5}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": N_CTX}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 10**9}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "seed": -7}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1e6}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 100}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": [10**12]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "invalid_type"),
    ("/v1/completions", {}, 400, "missing_required_parameter"),
    ("/v1/completions", {"prompt": "hello " * 600}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "x", "model": 5}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 600}]}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, 400,
     "invalid_value"),
    ("/v1/embeddings", {"input": []}, 400, "invalid_type"),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "model_not_found"),
    ("/v1/embeddings", {"input": "hello " * 600}, 400, "context_length_exceeded"),
    ("/tokenize", {"content": 5}, 400, "invalid_type"),
    ("/detokenize", {"tokens": [-1]}, 400, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_4xx_with_an_openai_error_body(srv, path, body, status, code):
    assert error_of(srv.post(path, body), status)["code"] == code


def test_unknown_routes_and_methods_and_the_openai_client_errors(srv):
    assert error_of(httpx.get(srv.base + "/v1/nothing"), 404)["code"] == "not_found"
    error_of(httpx.get(srv.base + "/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert "max_tokens" in str(e.value)
    r = srv.client.completions.create(model=MODEL, prompt="x", max_tokens=2)  # still serving
    assert r.choices[0].finish_reason in ("length", "stop")


# Any JSON a client may send: every field the routes read (and some they do not), each with a plausible
# or a hostile value. max_tokens stays small or invalid so that no request runs long.
_WEIRD = st.sampled_from([None, True, False, -1, 0, 1, 2, 2**31, 2**63, -2**63, 10**30, 0.5, -0.0, 1e308, -1e308,
                          "", "x", "\ud800", "\x00", "<|im_end|>", "{{ raise_exception('x') }}", "a" * 2000])
_JSON = st.recursive(_WEIRD | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["type", "role", "content", "name", "text", "function",
                                                        "arguments", "json_schema", "schema", "a"]), inner, max_size=3),
                     max_leaves=6)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard"]) | _JSON,
     "content": st.sampled_from(["hi", "", None, [{"type": "text", "text": "hi"}], [{"type": "image_url"}]]) | _JSON},
    optional={"tool_calls": _JSON, "name": _JSON, "tool_call_id": _JSON})
_SMALL = st.sampled_from([1, 2, 3, 0, -1, 10**30, "2", 2.5, True])  # never None: a reply to the context end
_NAMES = ["temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
          "repeat_penalty", "repeat_last_n", "logprobs", "top_logprobs", "stream", "stream_options", "response_format",
          "grammar", "tools", "tool_choice", "logit_bias", "echo", "model", "user", "add_special", "with_pieces",
          "suffix", "encoding_format", "dimensions", "parallel_tool_calls", "metadata", "instructions", "text",
          "system", "stop_sequences", "top_n_sigma", "typical_p", "xtc_probability", "xtc_threshold", "mirostat",
          "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
          "dry_sequence_breakers", "n_probs", "post_sampling_probs"]
_NUMBER = st.integers(-2**70, 2**70) | st.sampled_from([-1, 0, 1, 2, 5, 0.5, -0.5, 1e308]) | st.floats(-10, 10)
# a few fields at a time (most requests with many hostile fields stop at the first), numbers more often
# than other values: they reach the checks behind the first ones
_FIELDS = st.dictionaries(st.sampled_from(_NAMES), _NUMBER | _NUMBER | _JSON | st.booleans(), max_size=3).map(
    lambda d: {k: v for k, v in d.items() if not (k == "n" and isinstance(v, int) and v > 4)})  # n: time
_BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": st.sampled_from(["Hello", ["a", "b"], [1, 2, 3], "\ud800x"]) | _JSON,
                           "max_tokens": _SMALL, "fields": _FIELDS}).map(lambda b: ("/v1/completions", b)),
    st.fixed_dictionaries({"messages": st.lists(_MESSAGE, min_size=1, max_size=3) | _JSON,
                           "max_completion_tokens": _SMALL, "fields": _FIELDS}).map(
                               lambda b: ("/v1/chat/completions", b)),
    st.fixed_dictionaries({"input": st.sampled_from(["hi", ["a", "b"], [1, 2], [[1, 2]]]) | _JSON,
                           "fields": _FIELDS}).map(lambda b: ("/v1/embeddings", b)),
    st.fixed_dictionaries({"content": st.sampled_from(["hi", "\ud800"]) | _JSON, "fields": _FIELDS}).map(
        lambda b: ("/tokenize", b)),
    st.fixed_dictionaries({"input": st.sampled_from(["hi", [{"role": "user", "content": "hi"}],
                                                     [{"type": "function_call_output", "call_id": "c", "output": "x"}]])
                           | _JSON, "max_output_tokens": _SMALL, "fields": _FIELDS}).map(
                               lambda b: ("/v1/responses", b)),
    st.fixed_dictionaries({"messages": st.lists(_MESSAGE, min_size=1, max_size=2) | _JSON, "max_tokens": _SMALL,
                           "fields": _FIELDS}).map(lambda b: ("/v1/messages", b)),
    st.fixed_dictionaries({"prompt": st.sampled_from(["Hello", [1, 2, 3]]) | _JSON,
                           "n_predict": st.sampled_from([1, 2, 0, -2, 10**30, "2", 2.5, True]),  # not -1: no limit
                           "fields": _FIELDS}).map(lambda b: ("/completion", b)),
    st.fixed_dictionaries({"tokens": st.sampled_from([[1, 2], [2**40]]) | _JSON}).map(lambda b: ("/detokenize", b)),
    st.fixed_dictionaries({"messages": st.lists(_MESSAGE, min_size=1, max_size=2) | _JSON,
                           "fields": _FIELDS}).map(lambda b: ("/apply-template", b)))


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(_NAMES + ["max_tokens", "max_completion_tokens", "best_of", "ignore_eos",
                                                     "prompt", "messages", "json_schema"]),
                            _NUMBER | _NUMBER | _JSON | st.booleans() | st.just(10**400), max_size=4),
       chat=st.booleans())
def test_request_fields_are_refused_with_a_4xx_or_taken_by_the_sampler(body, chat):
    """The routes' field checks (protocol.py), a thousand bodies without a server: each
    refuses with a 4xx naming the field, or hands on values the engine's own checks (Sampler) accept."""
    calls = [lambda: P.generation(body, 49152, 512, 8, chat), lambda: P.prompts(body, 49152),
             lambda: P.messages(body), lambda: P.tools(body), lambda: P.response_format(body)]
    for call in calls:
        try:
            got = call()
        except P.APIError as e:
            assert 400 <= e.status < 500 and e.body()["error"]["message"], e.body()
            continue
        if isinstance(got, P.Generation):
            Sampler(got.params)
            assert got.max_tokens is None or 1 <= got.max_tokens <= 512
            assert 1 <= got.n <= 8 and all(isinstance(s, str) for s in got.stop)
            assert all(0 <= k < 49152 and -100 <= v <= 100 for k, v in (got.params.logit_bias or {}).items())


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=_BODIES)
def test_any_request_gets_a_reply_or_a_4xx_and_the_server_goes_on(srv, case):
    """Whatever the JSON, an answer (a JSON body, or a stream that ends as its API ends one: [DONE],
    the Responses API's last event, llama.cpp's `stop: true`) or a 4xx with OpenAI's error body:
    never a 500, a dropped connection or a stuck slot."""
    path, body = case
    body = {**body, **body.pop("fields", {})}
    with httpx.stream("POST", srv.base + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"}) as r:
        text = r.read().decode()
    assert r.status_code in (200, 400, 404), (r.status_code, text[:300], body)
    if r.status_code != 200:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        last = text.rstrip().rsplit("\n\n", 1)[-1]
        if path == "/v1/responses":
            assert last.split("\n")[0] in ("event: response.completed", "event: response.incomplete"), text[-300:]
        elif path == "/v1/messages":
            assert last.split("\n")[0] == "event: message_stop", text[-300:]
        elif path == "/completion":
            assert json.loads(last[6:])["stop"] is True, text[-300:]
        else:
            assert last == "data: [DONE]", text[-300:]
    else:
        assert isinstance(json.loads(text), dict)
    wait_idle(srv, timeout=20)


def test_a_request_needing_more_kv_cache_than_the_memory_gets_503(srv, monkeypatch):
    from purelm.backends import kv_cache

    wait_idle(srv)
    block = srv.state.engine.cache.block_bytes
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 3 * block)  # the host, as the engine sees it
    # a prompt's block, and 3 blocks for each of 4 samples of up to 150 tokens: 13
    err = error_of(srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 150, "n": 4}), 503)
    assert err["code"] == "insufficient_memory" and "GiB of KV cache" in err["message"], err
    monkeypatch.undo()
    assert srv.client.completions.create(model=MODEL, prompt="Hi", max_tokens=150, n=4).usage.completion_tokens > 4


def test_requests_that_fit_alone_but_not_together_get_their_reply_or_503_never_500(smollm2_path, monkeypatch):
    """The host's memory ends at the cache's present size (its growth refused): the retained prefix
    is dropped, then each request either finishes or gets 503 insufficient_memory, and the requests
    that finish are the same as alone (greedy); the pass never fails them all with a 500."""
    from purelm.errors import MemoryLimitError

    s = Server(purelm.load(smollm2_path, n_ctx=N_CTX), ServerConfig(parallel=8, max_queue=64))
    try:
        body = {"prompt": "Hi", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        alone = s.post("/v1/completions", body).json()["choices"][0]["text"]  # 2 of the 4 blocks the cache grew to
        wait_idle(s)
        cache = s.state.engine.cache
        (retained,) = s.state.engine._retained
        assert cache.capacity == 4

        def full(capacity):
            raise MemoryLimitError(f"growing the KV cache to {capacity * 64} positions: no memory (the test's host)")

        monkeypatch.setattr(cache, "_grow", full)
        results: list = [None] * 3

        def one(i):
            results[i] = s.post("/v1/completions", {**body, "stream": i == 2})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done = 0
        for r in results[:2]:
            if r.status_code == 200:
                done += 1
                assert r.json()["choices"][0]["text"] == alone
            else:
                assert error_of(r, 503)["code"] == "insufficient_memory"
        events = [json.loads(line[6:]) for line in results[2].text.splitlines()
                  if line.startswith("data: {")]
        if "error" in events[-1]:
            assert events[-1]["error"]["code"] == "insufficient_memory", events[-1]
        else:
            done += 1
            assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == alone
        assert 1 <= done < 3 and retained not in s.state.engine._retained
        wait_idle(s)
        monkeypatch.undo()
        r = s.client.completions.create(model=MODEL, prompt="Hi", max_tokens=100, n=3, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [alone] * 3
    finally:
        s.stop()


# ------------------------------------------------------------------------------ fill in the middle
@pytest.fixture(scope="module")
def fim_path(smollm2_path, tmp_path_factory):
    """SmolLM2 with three of its special tokens declared as FIM prefix / suffix / middle and its
    <file_sep> as FIM_SEP (its <reponame> is found as FIM_REP by its text, as llama.cpp finds it)."""
    from conftest import rewrite_gguf
    from purelm.formats.gguf import ValueType

    keys = {"fim_pre": 11, "fim_suf": 12, "fim_mid": 13, "fim_sep": 5}
    return rewrite_gguf(smollm2_path, tmp_path_factory.mktemp("fim") / "fim.gguf",
                        {f"tokenizer.ggml.{k}_token_id": (v, ValueType.UINT32) for k, v in keys.items()})


def test_infill_prompt_is_llama_cpps(fim_path, smollm2_path):
    """infill_ids lays the prompt out as llama-server's /infill does (benchmarks/infill_check.py
    compares the two servers' prompts token for token): repository and files first, then
    [PRE] prefix prompt [SUF] suffix [MID], each part cut to its budget."""
    from purelm.errors import UsageError
    from purelm.infill import infill_ids

    tok = purelm.load(fim_path, n_ctx=64).tokenizer
    assert (tok.fim_pre_id, tok.fim_suf_id, tok.fim_mid_id, tok.fim_rep_id, tok.fim_sep_id) == (11, 12, 13, 4, 5)

    def enc(text):
        return tok.encode(text, add_special=False, parse_special=False)

    ids = infill_ids(tok, "def f(x):\n    ", "\nprint(f(2))\n", "return", [("a.py", "import os\n")], n_ctx=8192)
    assert ids == [4, *enc("myproject\n"), 5, *enc("a.py\n"), *enc("import os\n"), 5, *enc("filename\n"),
                   11, *enc("def f(x):\n    "), *enc("return"), 12, *enc("\nprint(f(2))\n"), 13]
    # budgets of a 2048-token batch: the prefix's last 1536 tokens, the suffix's first 512 - 2 - 1
    # (a 1-token prompt), and what the context leaves of the extra files (their last tokens)
    long = infill_ids(tok, "a " * 3000, "b " * 3000, "c", [("x", "d " * 3000)], n_ctx=4096)
    extra = [4, *enc("myproject\n"), 5, *enc("x\n"), *enc("d " * 3000), 5, *enc("filename\n")]
    assert long == [*extra[-(4096 - 2048 + 2):], 11, *enc("a " * 3000)[-1536:], *enc("c"), 12,
                    *enc("b " * 3000)[:509], 13]
    with pytest.raises(UsageError, match="no fill-in-the-middle prefix/suffix/middle token"):
        infill_ids(purelm.load(smollm2_path, n_ctx=64).tokenizer, "a", "b")


def test_infill_and_llama_cpps_completion_routes(fim_path, srv):
    """/infill, /completion (llama.cpp's own API: n_predict, content, stop_type, no [DONE]) and
    /v1/completions with a suffix give the greedy reply LLM.generate gives the same ids; a model
    without FIM tokens answers 501 and 400."""
    from purelm.infill import infill_ids

    s = Server(purelm.load(fim_path, n_ctx=N_CTX), ServerConfig(parallel=2))
    try:
        ref = purelm.load(fim_path, n_ctx=N_CTX)
        body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n", "n_predict": 8,
                "temperature": 0, "input_extra": [{"filename": "util.py", "text": "import os\n"}]}
        ids = infill_ids(ref.tokenizer, body["input_prefix"], body["input_suffix"], "", [("util.py", "import os\n")],
                         n_ctx=N_CTX)
        want = ref.complete(ids, max_tokens=8, temperature=0)
        r = s.post("/infill", body).json()
        assert r["content"] == want.text and r["stop"] is True and r["tokens_evaluated"] == len(ids)
        assert r["stop_type"] == {"length": "limit", "stop": "eos"}[want.finish_reason]
        assert r["tokens_predicted"] == len(want.tokens) + (want.finish_reason == "stop")  # the EOG token counts
        events = s.post("/infill", {**body, "stream": True}).text.strip().split("\n\n")
        parts = [json.loads(e[6:]) for e in events]
        assert "".join(p["content"] for p in parts) == want.text and "[DONE]" not in events[-1]
        assert [p["stop"] for p in parts] == [False] * (len(parts) - 1) + [True]
        assert ref.infill(body["input_prefix"], body["input_suffix"], [("util.py", "import os\n")], max_tokens=8,
                          temperature=0) == want.text  # the Python API
        c = s.client.completions.create(model="fim", prompt=body["input_prefix"], suffix=body["input_suffix"],
                                        max_tokens=8, temperature=0)
        assert c.choices[0].text == ref.generate(infill_ids(ref.tokenizer, body["input_prefix"], body["input_suffix"],
                                                            n_ctx=N_CTX), max_tokens=8, temperature=0)
        plain = s.post("/completion", {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0}).json()
        assert plain["content"] == ref.generate("The capital of France is", max_tokens=6, temperature=0)
        assert plain["stop_type"] == "limit" and plain["tokens_predicted"] == 6
        word = s.post("/completion", {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0,
                                      "stop": ["zzz", plain["content"][:6]]}).json()
        assert (word["content"], word["stop_type"], word["stopping_word"]) == ("", "word", plain["content"][:6])
        long = s.post("/completion", {"prompt": ref.tokenize((ROOT / "README.md").read_text())[:N_CTX - 5],
                                      "n_predict": 10 * N_CTX, "temperature": 0}).json()  # stops at the context's end
        assert long["stop_type"] == "limit" and long["tokens_predicted"] == 5
        pytest.importorskip("llguidance")
        yes_no = s.post("/completion", {"prompt": "Is Paris in France? Answer:", "n_predict": 4,
                                        "grammar": 'root ::= " yes" | " no"'}).json()
        assert yes_no["content"] in (" yes", " no")
        assert error_of(s.post("/infill", {"input_suffix": "x"}), 400)["param"] == "input_prefix"
        assert error_of(s.post("/infill", {**body, "input_extra": [{"text": 1}]}), 400)["param"] == "input_extra"
        assert error_of(s.post("/completion", {"prompt": "x", "n_predict": 0}), 400)["param"] == "n_predict"
    finally:
        s.stop()
    assert error_of(srv.post("/infill", body), 501)["code"] == "not_supported"
    err = error_of(srv.post("/v1/completions", {"prompt": "def f(", "suffix": ")", "max_tokens": 2}), 400)
    assert err["param"] == "suffix" and "fill-in-the-middle" in err["message"]


def test_a_reply_short_of_blocks_restarts_a_prompt_still_prefilling(ref, monkeypatch):
    """The engine stepped by hand, its cache held at 3 blocks: reply A (100 tokens) reaches a block
    boundary while prompt B (130 tokens, 4 a step) holds the other 2. B gives its blocks back and
    starts again, A goes on, B finishes once A has: both greedy replies are those each gets alone,
    and B's prompt was evaluated more than once."""
    from purelm.errors import MemoryLimitError
    from purelm.server.engine import Engine, GenerationRequest, Handle, _Job

    engine = Engine(ref, parallel=4, batch=4, prefix_cache=False)
    engine.cache._grow(3)

    def full(capacity):
        raise MemoryLimitError("no memory (the test's host)")

    monkeypatch.setattr(engine.cache, "_grow", full)
    loop = asyncio.new_event_loop()
    params = P.SamplingParams(temperature=0.0)
    prompt_b = ref.tokenize((ROOT / "README.md").read_text()[:2000])[:130]
    jobs = {}
    for name, prompt, n in (("a", ref.tokenize("Hi"), 100), ("b", prompt_b, 5)):
        jobs[name] = _Job(GenerationRequest(prompt, n, params, ignore_eos=True), Handle(engine, loop, 1))
    engine._waiting.append(jobs["a"])
    for _ in range(40):  # A decodes to position 41
        engine._step()
    engine._waiting.append(jobs["b"])
    for _ in range(2000):
        engine._step()
        if not (engine._running or engine._prefilling or engine._waiting):
            break
    loop.run_until_complete(asyncio.sleep(0))
    for name, job in jobs.items():
        pieces = []
        while not job.handle.queue.empty():
            item = job.handle.queue.get_nowait()
            assert not isinstance(item, BaseException), (name, item)
            pieces += item
        want = ref.complete(job.req.prompt, max_tokens=job.req.max_tokens, temperature=0, ignore_eos=True)
        assert "".join(p.text for p in pieces) == want.text and pieces[-1].finish_reason == "length", name
    assert engine.prompt_tokens_evaluated > 1 + 130 + 4  # B's prompt went in again after a restart
    loop.close()


# ------------------------------------------------------------------------------ llama.cpp's routes, models
def test_tokenize_detokenize_health_models_metrics(srv, ref):
    ids = srv.post("/tokenize", {"content": "Hello, world!"}).json()["tokens"]
    assert ids == ref.tokenize("Hello, world!", add_special=False)
    pieces = srv.post("/tokenize", {"content": "Hello", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": i, "piece": ref.detokenize([i])} for i in ref.tokenize("Hello", add_special=False)]
    assert srv.post("/detokenize", {"tokens": ids}).json() == {"content": "Hello, world!"}
    props = httpx.get(srv.base + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] == N_CTX and props["total_slots"] == 8
    assert props["chat_template"] == srv.llm.chat_template.source and props["model_alias"] == MODEL
    h = httpx.get(srv.base + "/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 8
    m = srv.client.models.list().data
    assert [x.id for x in m] == [MODEL] and httpx.get(srv.base + "/models").status_code == 200
    srv.client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    text = httpx.get(srv.base + "/metrics").text
    for name in ("purelm_requests_total", "purelm_generated_tokens_total", "purelm_prompt_tokens_total",
                 "purelm_requests_waiting", "purelm_slots_used", "purelm_time_to_first_token_seconds_bucket",
                 "purelm_tokens_per_second"):
        assert name in text, name
    gen = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("purelm_generated_tokens_total")]
    assert gen[0] >= 2
    assert 'purelm_requests_total{route="/v1/completions",status="200"}' in text


def test_apply_template_renders_the_prompt_the_chat_route_runs(srv):
    msgs = [{"role": "user", "content": "Name a colour."}]
    prompt = srv.post("/apply-template", {"messages": msgs}).json()["prompt"]
    # SmolLM2's template: ChatML with its default system prompt (the file's tokenizer.chat_template)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    chat = srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0}).json()
    native = srv.post("/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0,
                                      "stop": ["<|im_end|>"]}).json()
    assert native["content"] == chat["choices"][0]["message"]["content"]
    assert native["tokens_evaluated"] == chat["usage"]["prompt_tokens"]
    bad = srv.post("/apply-template", {"messages": "hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_apply_template_writes_what_a_template_echoes_of_the_request(smollm2_path):
    """A template that shows a chat_template_kwargs value: a lone surrogate in it (valid JSON) comes
    back replaced, not as a 500."""
    from purelm.chat import ChatTemplate

    llm = purelm.load(smollm2_path, n_ctx=256)
    llm.chat_template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}|{{ note }}",
                                     tokenizer=llm.tokenizer)
    s = Server(llm, ServerConfig(parallel=1))
    try:
        body = '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"note": "\\ud800!"}}'
        r = s.post("/apply-template", body)
        assert r.status_code == 200 and r.json() == {"prompt": "hi|?!"}, r.text
    finally:
        s.stop()


def test_embeddings_match_llm_embed(srv, ref):
    texts = ["The cat sat on the mat.", "Stock markets fell sharply.", "The cat sat on the mat."]
    r = srv.client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 576) and [d.index for d in r.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert np.array_equal(vecs[0], vecs[2])
    want = ref.embed(texts)
    assert np.allclose(vecs, want, atol=1e-5)
    assert float(vecs[0] @ vecs[1]) < 0.99
    f = srv.post("/v1/embeddings", {"input": "The cat sat on the mat.", "encoding_format": "float"}).json()
    assert np.allclose(f["data"][0]["embedding"], want[0], atol=1e-5)
    assert f["usage"]["prompt_tokens"] == len(ref.tokenize(texts[0]))


def test_llm_embed_api(ref):
    one = ref.embed("hello")
    two = ref.embed(["hello", "world"])
    assert one.shape == (576,) and two.shape == (2, 576) and one.dtype == np.float32
    assert np.array_equal(one, two[0]) and abs(np.linalg.norm(one) - 1) < 1e-5
    with pytest.raises(purelm.UsageError):
        ref.embed(5)
    with pytest.raises(purelm.ContextOverflowError):
        ref.embed("hello " * 600)


def test_prefix_of_a_finished_request_is_reused(srv, ref):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    before = srv.state.engine.prompt_tokens_reused
    msgs2 = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=8, temperature=0)
    assert srv.state.engine.prompt_tokens_reused - before >= 30
    assert r.choices[0].message.content == ref.chat(msgs2, max_tokens=8, temperature=0).content


# ------------------------------------------------------------------------------ speculative decoding
COPY_PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3,",
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add(",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on",
    "Once upon a time",  # little to look up: mostly plain steps
]


def test_lookup_decoding_gives_the_replies_of_plain_decoding(srv, ref):
    """`purelm serve --lookup N`: concurrent greedy replies (drafts checked in the same passes as other
    requests' tokens) equal plain decoding's, token logprobs included; drafts are accepted on prompts
    that repeat themselves; sampled requests still get their full length; /metrics counts the drafts."""
    spec = Server(purelm.load(ref.path, n_ctx=N_CTX), ServerConfig(parallel=4, lookup=8))
    try:
        engine = spec.state.engine
        assert engine.n_draft == 8
        from purelm.errors import UsageError
        from purelm.server.engine import Engine

        for bad in (-1, 2.5, True):
            with pytest.raises(UsageError, match="lookup"):
                Engine(ref, lookup=bad)

        async def run_all():
            async with httpx.AsyncClient(base_url=spec.base, timeout=120) as c:
                async def one(prompt, stream):
                    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "logprobs": 2, "stream": stream}
                    if not stream:
                        r = await c.post("/v1/completions", json=body)
                        assert r.status_code == 200, r.text
                        ch = r.json()["choices"][0]
                        return ch["text"], ch["logprobs"]["token_logprobs"]
                    texts, lps = [], []
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                for ch in json.loads(line[6:])["choices"]:
                                    texts.append(ch["text"])
                                    lps += ch["logprobs"]["token_logprobs"] if ch.get("logprobs") else []
                    return "".join(texts), lps
                return await asyncio.gather(*[one(p, i % 2 == 1) for i, p in enumerate(COPY_PROMPTS)])

        got = asyncio.run(run_all())
        for prompt, (text, lps) in zip(COPY_PROMPTS, got):
            assert text == ref.generate(prompt, max_tokens=40, temperature=0), prompt
            plain = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logprobs=2)
            assert lps == plain.choices[0].logprobs.token_logprobs, prompt  # the same bits, verify pass or not
        assert engine.accepted_tokens >= 20 and engine.draft_tokens >= engine.accepted_tokens, \
            (engine.draft_tokens, engine.accepted_tokens)

        r = spec.client.completions.create(model=MODEL, prompt=COPY_PROMPTS[0], max_tokens=30, temperature=0.8,
                                           seed=3, n=2, extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 60
        metrics = httpx.get(spec.base + "/metrics").text
        assert f"purelm_draft_tokens_accepted {float(engine.accepted_tokens)}" in metrics
        # a logit_bias applies to drafts too (speculative decoding checks them against the biased logits)
        tokens = [c.token for c in ref.stream_chunks(COPY_PROMPTS[0], max_tokens=40, temperature=0)]
        bias = {tokens[7]: -100.0, tokens[13]: 3.0}  # "6" never, "8" more
        assert len(bias) == 2
        want = ref.generate(COPY_PROMPTS[0], max_tokens=40, temperature=0, logit_bias=bias)
        before = engine.draft_tokens
        r = spec.client.completions.create(model=MODEL, prompt=COPY_PROMPTS[0], max_tokens=40, temperature=0,
                                           logit_bias={str(k): v for k, v in bias.items()})
        assert r.choices[0].text == want != ref.generate(COPY_PROMPTS[0], max_tokens=40, temperature=0)
        assert engine.draft_tokens > before
        wait_idle(spec)
        assert not spec.state.engine.cache.seqs or all(
            s.n_past == len(toks) for s, toks in ((spec.state.engine.cache.seqs[q], t)
                                                 for q, t in spec.state.engine._retained.items()))
    finally:
        spec.stop()


# ------------------------------------------------------------------------------ limits, key, failures
@pytest.fixture(scope="module")
def small(smollm2_path):
    s = Server(purelm.load(smollm2_path, n_ctx=2048), ServerConfig(parallel=1, max_queue=1, api_key="sekret"))
    yield s
    s.stop()


def test_api_key_queue_limit_and_a_failing_step(small):
    assert httpx.get(small.base + "/health").status_code == 200  # public
    assert error_of(httpx.get(small.base + "/v1/models"), 401)["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sekret"}
    assert httpx.get(small.base + "/v1/models", headers=auth).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        small.client.models.list()
    client = openai.OpenAI(base_url=small.base + "/v1", api_key="sekret", max_retries=0)

    # one slot busy, one request waiting: the next is refused with 503
    body = {"prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}  # seconds: they will not end
    with httpx.Client(base_url=small.base, timeout=60, headers=auth) as c:
        with c.stream("POST", "/v1/completions", json=body) as r1:
            next(line for line in r1.iter_lines() if line.startswith("data: "))
            with c.stream("POST", "/v1/completions", json=body) as r2:
                t0 = time.monotonic()
                while small.state.engine.n_waiting < 1:
                    assert time.monotonic() - t0 < 10, (small.state.engine.slots_used, r1.is_closed)
                    time.sleep(0.01)
                r3 = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert error_of(r3, 503)["code"] == "queue_full"
                assert r2.status_code == 200
    t0 = time.monotonic()
    while small.state.engine.slots_used or small.state.engine.n_waiting:
        assert time.monotonic() - t0 < 20
        time.sleep(0.02)

    # a step that raises fails the request in it; the engine goes on
    model = small.state.engine.model
    real = model.forward_batch
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    model.forward_batch = flaky
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert "injected failure" in str(e.value)
        chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        model.forward_batch = real
    assert httpx.get(small.base + "/health").json()["slots_processing"] == 0


def test_body_size_limit(small):
    r = httpx.post(small.base + "/v1/completions", content=b"x" * (9 << 20),
                   headers={"Authorization": "Bearer sekret"})
    assert error_of(r, 413)["code"] == "body_too_large"


# ------------------------------------------------------------------------------ the command line
def test_cli_embed_and_serve_arguments(capsys, monkeypatch, tmp_path, smollm2_path, ref):
    from purelm.cli import main

    assert main(["embed", "-m", str(smollm2_path), "-c", "64", "hello", "world"]) == 0  # -m MODEL TEXT...
    lines = capsys.readouterr().out.splitlines()
    vecs = np.array([json.loads(line) for line in lines])
    assert vecs.shape == (2, 576) and np.allclose(vecs, ref.embed(["hello", "world"]), atol=1e-6)
    assert main(["embed", str(smollm2_path), "-c", "64", "hello"]) == 0  # MODEL TEXT
    assert np.allclose(json.loads(capsys.readouterr().out), ref.embed("hello"), atol=1e-6)
    for cmd in ("serve", "embed"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and cmd in capsys.readouterr().out
    import importlib.util

    real = importlib.util.find_spec
    try:  # without the server extra: one line naming the pip command
        importlib.util.find_spec = lambda name, *a: None if name == "fastapi" else real(name, *a)
        assert main(["serve", str(smollm2_path)]) == 1
        assert "pip install 'purelm[server]'" in capsys.readouterr().err
    finally:
        importlib.util.find_spec = real
    for args, says in ((["--parallel", "0"], "--parallel"), (["--port", "70000"], "--port"),
                       (["--batch", "0"], "--batch"),
                       (["-t", "0"], "--threads"), (["-c", "0"], "--ctx"), (["--lookup", "0"], "--lookup"),
                       (["-n", "0"], "-n must be"), (["--temp", "-1"], "--temp"), (["--mirostat", "5"], "--mirostat"),
                       (["--chat-template", "nope"], "not a built-in template"),
                       (["--chat-template-file", "/no/such/file"], "--chat-template-file"),
                       (["--chat-template", "chatml", "--chat-template-file", "x"], "give one of")):
        assert main(["serve", str(smollm2_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("purelm: error: ") and says in err, (args, err)
    import purelm.server

    configs = []
    monkeypatch.delenv("PURELM_API_KEY", raising=False)
    real_serve = purelm.server.serve
    try:  # an empty --api-key (an unset shell variable) serves without a key, and says so
        purelm.server.serve = lambda llm, host, port, config, **kw: configs.append((llm, config))
        for key, warned in (("", True), ("  ", True), ("sekret", False)):
            assert main(["serve", str(smollm2_path), "-c", "64", "--api-key", key]) == 0
            assert ("--api-key is empty" in capsys.readouterr().err) == warned
        assert [c.api_key for _, c in configs] == [None, None, "sekret"]
        assert configs[0][1].sampling == SamplingParams() and configs[0][1].n_predict is None
        template = tmp_path / "t.jinja"
        template.write_text("{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:")
        assert main(["serve", str(smollm2_path), "-c", "64", "--temp", "0", "--top-k", "5", "-n", "7", "-s", "3",
                     "--dry-multiplier", "0.5", "--chat-template-file", str(template)]) == 0
        llm, config = configs[-1]
        assert config.sampling == SamplingParams(temperature=0, top_k=5, seed=3, dry_multiplier=0.5)
        assert config.n_predict == 7
        assert llm.chat_template.render([{"role": "user", "content": "hi"}]) == "Q: hi\nA:"
        assert main(["serve", str(smollm2_path), "-c", "64", "--chat-template", "llama3"]) == 0
        assert configs[-1][0].chat_template.name == "llama-3"
    finally:
        purelm.server.serve = real_serve


def test_the_servers_request_defaults_fill_the_fields_a_request_leaves_out(srv, ref):
    """ServerConfig.sampling and n_predict (purelm serve's sampling flags and -n, as llama-server's):
    a request without temperature or max_tokens gets them; one that gives its own keeps its own; /props
    shows them."""
    config = srv.state.config
    try:
        config.sampling, config.n_predict = SamplingParams(temperature=0, seed=11), 5
        prompt = "The capital of France is"
        want = ref.generate(prompt, max_tokens=5, temperature=0)
        r = srv.client.completions.create(model=MODEL, prompt=prompt)
        assert r.choices[0].text == want and r.usage.completion_tokens == 5
        r = httpx.post(srv.base + "/completion", json={"prompt": prompt}, timeout=60).json()
        assert r["content"] == want
        msgs = [{"role": "user", "content": "Say hi"}]
        chat = srv.client.chat.completions.create(model=MODEL, messages=msgs)
        assert chat.choices[0].message.content == ref.chat(msgs, max_tokens=5, temperature=0).content
        r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=1.0)
        assert r.usage.completion_tokens == 3
        assert r.choices[0].text == ref.generate(prompt, max_tokens=3, temperature=1.0, seed=11)  # the default seed
        props = httpx.get(srv.base + "/props", timeout=10).json()["default_generation_settings"]["params"]
        assert props["temperature"] == 0 and props["n_predict"] == 5 and props["seed"] == 11
        # a default logit bias holds unless a request gives its own; false bans a token, as in llama-server
        first = next(c.token for c in ref.stream_chunks(prompt, max_tokens=1, temperature=0))
        banned = ref.generate(prompt, max_tokens=5, temperature=0, logit_bias={first: -math.inf})
        assert banned != want
        config.sampling = SamplingParams(temperature=0, logit_bias={first: -math.inf})
        assert srv.client.completions.create(model=MODEL, prompt=prompt).choices[0].text == banned
        assert srv.client.completions.create(model=MODEL, prompt=prompt, logit_bias={}).choices[0].text == want
        props = httpx.get(srv.base + "/props", timeout=10).json()["default_generation_settings"]["params"]
        assert props["logit_bias"] == [[first, False]]
        config.sampling = SamplingParams(temperature=0)
        r = httpx.post(srv.base + "/completion", json={"prompt": prompt, "logit_bias": {str(first): False}}).json()
        assert r["content"] == banned
    finally:
        config.sampling, config.n_predict = SamplingParams(), None


def test_purelm_serve_command_serves_and_stops_on_sigterm(smollm2_path):
    """`purelm serve` runs the engine in its main thread and uvicorn beside it: a request, then SIGTERM
    ends it cleanly (exit 0); a port already taken is one error line and exit 1."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PURELM_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "purelm.cli", "serve", str(smollm2_path), "-c", "128", "-q",
                             "--port", str(port), "--alias", "tiny"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 60, "the server did not start"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        taken = subprocess.run([sys.executable, "-m", "purelm.cli", "serve", str(smollm2_path), "-c", "64", "-q",
                                "--port", str(port)], env=env, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1 and "purelm: error: could not serve" in taken.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_native_completion_lists_each_tokens_probabilities(srv, ref):
    """/completion's n_probs (llama-server's completion_probabilities): each token's logprob and its
    likeliest candidates' from the model's logits; with post_sampling_probs, the probabilities the
    sampler drew from (here: top_k 5, min_p 0.05, temperature 0.8); streamed, one event per token."""
    prompt = "The capital of France is"
    r = srv.post("/completion", {"prompt": prompt, "n_predict": 5, "temperature": 0, "n_probs": 3}).json()
    entries = r["completion_probabilities"]
    assert len(entries) == r["tokens_predicted"] == 5
    ids = ref.tokenize(prompt)
    for e in entries:
        want = _log_softmax(ref.logits(ids)[-1].astype(np.float64))
        top = np.argsort(-want, kind="stable")[:3]
        assert e["id"] == top[0] and [t["id"] for t in e["top_logprobs"]] == list(top)
        assert math.isclose(e["logprob"], want[e["id"]], abs_tol=1e-4)
        for t in e["top_logprobs"]:
            assert math.isclose(t["logprob"], want[t["id"]], abs_tol=1e-4)
            assert bytes(t["bytes"]) == ref.tokenizer.token_to_piece(t["id"]) and t["token"] == bytes(t["bytes"]).decode()
        ids.append(e["id"])
    assert "".join(e["token"] for e in entries) == r["content"]

    body = {"prompt": prompt, "n_predict": 4, "temperature": 0.8, "top_k": 5, "n_probs": 3,
            "post_sampling_probs": True, "seed": 3}
    drawn = srv.post("/completion", body).json()["completion_probabilities"]
    ids = ref.tokenize(prompt)
    for e in drawn:  # each token's own candidates (llama.cpp's defaults for top_p and min_p too)
        cand, probs = Sampler(SamplingParams(temperature=0.8, top_k=5)).probabilities(ref.logits(ids)[-1])
        assert set(e) == {"id", "token", "bytes", "prob", "top_probs"} and e["id"] in cand
        assert [t["id"] for t in e["top_probs"]] == list(cand[:3])
        np.testing.assert_allclose([t["prob"] for t in e["top_probs"]], probs[:3], rtol=1e-9)
        assert math.isclose(e["prob"], probs[list(cand).index(e["id"])], rel_tol=1e-9)
        ids.append(e["id"])
    assert len(drawn) == 4
    # post_sampling_probs alone lists nothing (and keeps nothing: the engine stores candidates only to list them)
    alone = srv.post("/completion", {**body, "n_probs": 0}).json()
    assert "completion_probabilities" not in alone and alone["tokens_predicted"] == 4

    stop = srv.post("/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0, "n_probs": 1,
                                    "stop": [".\n"]}).json()  # the stop string's tokens are left out
    assert stop["stop_type"] == "word" and [e["token"] for e in stop["completion_probabilities"]] == [" Paris"]

    events = []
    with httpx.stream("POST", srv.base + "/completion", timeout=60,
                      json={"prompt": prompt, "n_predict": 5, "temperature": 0, "logprobs": 3, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["completion_probabilities"] for e in events[:-1]] == [[e] for e in entries]
    assert "completion_probabilities" not in events[-1]
    for bad in ({"n_probs": -1}, {"n_probs": P.MAX_N_PROBS + 1}, {"n_probs": "3"}, {"post_sampling_probs": 1},
                {"n_probs": 2, "logprobs": "x"}):
        name = list(bad)[-1]
        assert error_of(srv.post("/completion", {"prompt": prompt, **bad}), 400)["param"] == name


LLAMA_BIN = LLAMA_CPP / "build" / "bin"


def test_native_completion_probabilities_match_llama_servers(srv, smollm2_path):
    """The same /completion requests to llama-server (built by ../shared/peers/build-llama-cpp.sh) on the
    same file: the same fields at every level, the same tokens (greedy), logprobs within 0.15 (two
    engines' rounding), the end-of-generation token listed and a stop string's tokens left out alike."""
    exe = LLAMA_BIN / "llama-server"
    if not exe.is_file():
        pytest.skip(f"llama-server is not at {exe} (set PURELM_LLAMA_CPP_DIR)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([str(exe), "-m", str(smollm2_path), "--port", str(port), "-c", str(N_CTX), "-np", "1",
                             "-t", "1", "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None and time.monotonic() - t0 < 60, "llama-server did not start"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        chat = "<|im_start|>user\nWhat is 2+2? Reply with a number only.<|im_end|>\n<|im_start|>assistant\n"
        bodies = [{"prompt": "The capital of France is", "n_predict": 4, "n_probs": 3},
                  {"prompt": "The capital of France is", "n_predict": 8, "n_probs": 1, "stop": [".\n"]},
                  {"prompt": chat, "n_predict": 40, "logprobs": 2}]
        for body in bodies:
            body = {"temperature": 0, **body}
            ours = srv.post("/completion", body).json()
            theirs = httpx.post(base + "/completion", json=body, timeout=60).json()
            assert (ours["content"], ours["stop_type"]) == (theirs["content"], theirs["stop_type"])
            a, b = ours["completion_probabilities"], theirs["completion_probabilities"]
            assert len(a) == len(b) and [set(e) for e in a] == [set(e) for e in b]
            for x, y in zip(a, b):
                assert (x["id"], x["token"], x["bytes"]) == (y["id"], y["token"], y["bytes"])
                assert abs(x["logprob"] - y["logprob"]) < 0.15
                assert [set(t) for t in x["top_logprobs"]] == [set(t) for t in y["top_logprobs"]]
                assert x["top_logprobs"][0]["id"] == y["top_logprobs"][0]["id"]
        assert a[-1]["token"] == "" and a[-1]["bytes"] == []  # the end of the turn, a control token
        # sampled: each engine draws its own token; the candidates it drew from are the same
        body = {"prompt": "The capital of France is", "n_predict": 1, "n_probs": 3, "post_sampling_probs": True,
                "temperature": 0.8, "top_k": 5}
        (x,) = srv.post("/completion", body).json()["completion_probabilities"]
        (y,) = httpx.post(base + "/completion", json=body, timeout=60).json()["completion_probabilities"]
        assert set(x) == set(y) and [set(t) for t in x["top_probs"]] == [set(t) for t in y["top_probs"]]
        assert [t["id"] for t in x["top_probs"]] == [t["id"] for t in y["top_probs"]]
        assert np.allclose([t["prob"] for t in x["top_probs"]], [t["prob"] for t in y["top_probs"]], atol=0.02)
        assert x["id"] in [t["id"] for t in x["top_probs"]]
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------ LoRA adapters
def test_lora_adapters_per_request_and_for_the_server(fixtures):
    # llama-server's LoRA routes and `lora` field, on the tiny llama and its PEFT adapter (test_lora.py
    # checks the adapted logits against PEFT): each request runs with the scales it names, also when
    # requests with other scales are in flight (the engine runs one set of scales per pass)
    base, adapter = str(fixtures / "llama-f32.gguf"), str(fixtures / "peft" / "llama-lora-f32.gguf")
    ids = np.load(fixtures / "llama-ref-f32.npz")["ids"].tolist()
    ref = purelm.load(base, n_ctx=128, lora=[(adapter, 1.0), (adapter, 0.0)])

    def want(s0, s1, prompt):
        ref.set_lora_scales([s0, s1])
        return ref.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True)

    s = Server(purelm.load(base, n_ctx=128, lora=[(adapter, 1.0), (adapter, 0.0)]), ServerConfig(parallel=4))
    try:
        listed = httpx.get(s.base + "/lora-adapters").json()
        assert [(a["id"], a["path"], a["scale"]) for a in listed] == [(0, adapter, 1.0), (1, adapter, 0.0)]

        def complete(prompt, lora=None):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            if lora is not None:
                body["lora"] = lora
            r = s.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        cases = [(None, (1.0, 0.0)), ([{"id": 1, "scale": 0.5}], (0.0, 0.5)), ([{"id": 0, "scale": 0}], (0.0, 0.0)),
                 ([{"id": 0, "scale": 0.25}, {"id": 1, "scale": 0.25}], (0.25, 0.25)), ([], (1.0, 0.0))]
        prompts = [ids[i:i + 9] for i in range(len(cases))]
        expected = [want(*scales, p) for (_, scales), p in zip(cases, prompts)]
        assert len(set(expected[:3])) == 3  # the scales change the replies
        assert [complete(p, lora) for (lora, _), p in zip(cases, prompts)] == expected
        with concurrent.futures.ThreadPoolExecutor(len(cases) * 2) as pool:  # all at once, twice over
            got = list(pool.map(lambda c: complete(prompts[c % len(cases)], cases[c % len(cases)][0]),
                                range(len(cases) * 2)))
        assert got == expected * 2

        # the server's scales: for requests naming none; the adapters left out go to 0
        assert s.post("/lora-adapters", [{"id": 1, "scale": 0.5}]).json() == {"success": True}
        assert [a["scale"] for a in httpx.get(s.base + "/lora-adapters").json()] == [0.0, 0.5]
        assert complete(prompts[0]) == want(0.0, 0.5, prompts[0])
        assert complete(prompts[0], [{"id": 0, "scale": 1}]) == expected[0]

        for body in ({"lora": {"id": 0}}, {"lora": [{"id": 2, "scale": 1}]}, {"lora": [{"id": 0, "scale": "1"}]},
                     {"lora": [5]}, {"lora": [{"scale": 1}]},
                     {"lora": [{"id": 0, "scale": 1e300}]}, {"lora": [{"id": True, "scale": 1}]}):
            error_of(s.post("/v1/completions", {"prompt": prompts[0], "max_tokens": 2, **body}), 400)
            error_of(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2, **body}), 400)
        for body in ({"id": 0, "scale": 1}, [{"id": 9, "scale": 1}], "x"):
            error_of(s.post("/lora-adapters", body), 400)
        assert [a["scale"] for a in httpx.get(s.base + "/lora-adapters").json()] == [0.0, 0.5]
        # what GET lists, posted back with a scale changed (llama-server ignores the other keys too)
        listed = httpx.get(s.base + "/lora-adapters").json()
        listed[0]["scale"] = 0.25
        assert s.post("/lora-adapters", listed).json() == {"success": True}
        assert [a["scale"] for a in httpx.get(s.base + "/lora-adapters").json()] == [0.25, 0.5]

        # an embedding (at the server's scales) is not starved by requests with other scales
        ref.set_lora_scales([0.25, 0.5])
        want_vec = ref.embed("hello world")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            busy = [pool.submit(complete, prompts[0], [{"id": 0, "scale": 1}]) for _ in range(5)]
            r = s.post("/v1/embeddings", {"input": "hello world"})
            assert all(b.result() == expected[0] for b in busy)
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["data"][0]["embedding"]) - want_vec).max() < 1e-5
    finally:
        s.stop()


def test_a_server_without_adapters_refuses_lora(srv):
    assert httpx.get(srv.base + "/lora-adapters").json() == []
    err = error_of(srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "lora": [{"id": 0, "scale": 1}]}),
                   400)
    assert "no LoRA adapters" in err["message"]
    assert srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "lora": []}).status_code == 200


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(value=st.lists(st.fixed_dictionaries({"id": _NUMBER | _JSON | st.integers(-2, 4),
                                             "scale": _NUMBER | _JSON | st.floats(-2, 2)})
                      | _JSON, max_size=4) | _JSON, n=st.sampled_from([0, 1, 3]))
def test_lora_fields_are_refused_with_a_4xx_or_give_each_adapter_a_scale(value, n):
    try:
        got = P.lora_scales(value, n)
    except P.APIError as e:
        assert 400 <= e.status < 500 and e.body()["error"]["message"] and e.body()["error"]["param"] == "lora"
        return
    assert got is None or (len(got) == n and all(isinstance(v, float) and abs(v) <= P.MAX_LORA_SCALE for v in got))
