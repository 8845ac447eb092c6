"""Chat templates (rendering, detection, the sandbox), tool calls, llm.chat and `purelm chat`."""
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import purelm
from conftest import FIXTURES, rewrite_gguf
from purelm.chat import (ChatTemplate, detect_builtin, detect_family, fit_messages, parse_tool_calls,
                         validate_messages)
from purelm.chat.tool_calls import ContentStream
from purelm.cli import main
from purelm.errors import TemplateError, UsageError
from purelm.formats.gguf import GGUFFile
from purelm.tokenizer import Tokenizer

ROOT = Path(__file__).parent.parent

# The conversation of llama.cpp's tests/test-chat-template.cpp (main_automated_tests); the expected
# strings below are that file's, for the template named beside each (bos_token "", eos_token "</s>").
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
UPSTREAM = {
    # "teknium/OpenHermes-2.5-Mistral-7B" (= llama.cpp's chatml)
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
              "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
              "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question"
              "<|im_end|>\n<|im_start|>assistant\n",
    # "bofenghuang/vigogne-2-70b-chat", expected_output_jinja: Llama 2 chat's format with an empty BOS
    "llama-2": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>[INST] Who are "
               "you [/INST] I am an assistant </s>[INST] Another question [/INST]",
    # "Llama-3"
    "llama-3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>"
               "user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there"
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>"
               "assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    # "google/gemma-7b-it", expected_output: llama.cpp's gemma, the system prompt opening the first user turn
    "gemma": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
             "<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant"
             "<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
    # "Phi-3-small" (= llama.cpp's phi3)
    "phi-3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
             "<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question"
             "<|end|>\n<|assistant|>\n",
    # "Mistral-Large-Instruct-2407 (mistralai 'v3' template)", expected_output_jinja: the system prompt opens
    # the last user turn, as Mistral's own template puts it
    "mistral": "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] You are a "
               "helpful assistant\n\nAnother question[/INST]",
}

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                             "required": ["city"]}}}]


def spm_tokenizer(tokens, name=None):
    """A small SentencePiece-style vocabulary with these extra tokens, as a GGUF file would give it."""
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": base + list(tokens),
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1, 1, 1] + [3] * len(tokens),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    if name:
        meta["general.name"] = name
    return meta, Tokenizer.from_gguf_metadata(meta)


# --- rendering -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_template(smollm2_path):
    f = GGUFFile(smollm2_path)
    return ChatTemplate.from_gguf(f.metadata, Tokenizer.from_gguf_metadata(f.metadata, path=f.path))


def test_smollm2_template_renders_as_transformers(smollm2_template):
    # SmolLM2-135M-Instruct's tokenizer_config.json template, as transformers' apply_chat_template(...,
    # tokenize=False) writes it: its default system message first, then chatml turns (checked by hand).
    t = smollm2_template
    assert t.name == "chatml" and not t.is_builtin and t.bos_token == "<|im_start|>" and t.eos_token == "<|im_end|>"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2+2?"}]
    body = (SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    assert t.render(conv, add_generation_prompt=False) == body
    assert t.render(conv) == body + "<|im_start|>assistant\n"
    # A system message of one's own replaces the default one.
    assert t.render([{"role": "system", "content": "Be brief."}, conv[0]]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # transformers tokenizes the rendered text without adding specials; SmolLM2 asks for no BOS.
    assert t.apply(conv) == t.tokenizer.encode(body + "<|im_start|>assistant\n", add_special=False)
    assert t.stop_strings == ("<|im_end|>",) and t.stop_token_ids == frozenset(t.tokenizer.eog_ids)


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_builtin_templates_render_the_upstream_format(name):
    t = ChatTemplate.builtin(name, bos_token="", eos_token="</s>")
    assert t.name == name and t.is_builtin
    assert t.render(CONVERSATION) == UPSTREAM[name]
    assert detect_family(t.source) == name  # llama.cpp's detection recognises each built-in


def test_builtin_templates_with_bos_and_without_generation_prompt():
    three = CONVERSATION[:3]
    # The Llama 2 format of https://huggingface.co/blog/llama2#how-to-prompt-llama-2 (cited by llama.cpp).
    assert ChatTemplate.builtin("llama-2", bos_token="<s>", eos_token="</s>").render(three) == \
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>"
    assert ChatTemplate.builtin("llama-3", bos_token="<|begin_of_text|>").render(three, add_generation_prompt=False) == \
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
         "\n\nHi there<|eot_id|>")
    assert ChatTemplate.builtin("gemma", bos_token="<bos>").render(three[1:2]) == \
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    assert ChatTemplate.builtin("phi-3", eos_token="<|endoftext|>").render(three, add_generation_prompt=False) \
        .endswith("<|assistant|>\nHi there<|end|>\n<|endoftext|>")
    assert ChatTemplate.builtin("chatml").render(three[1:2], add_generation_prompt=False) == \
        "<|im_start|>user\nHello<|im_end|>\n"
    # Templates that insist on alternating roles say so, as one TemplateError.
    with pytest.raises(TemplateError, match="alternate"):
        ChatTemplate.builtin("gemma").render([CONVERSATION[1], CONVERSATION[3]])


def test_bos_is_written_once():
    _, tok = spm_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert tok.add_bos
    t = ChatTemplate.builtin("llama-3", tok)  # the template writes BOS; the vocabulary asks for it too
    ids = t.apply([{"role": "user", "content": "a"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    ids = ChatTemplate.builtin("chatml", tok).apply([{"role": "user", "content": "a"}])  # writes none
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_messages_are_checked():
    t = ChatTemplate.builtin("chatml")
    for bad in ("hi", {"role": "user"}, [], ["hi"], [{"content": "x"}], [{"role": "", "content": "x"}],
                [{"role": "user", "content": 3}], [{"role": "user"}], [{"role": "user", "content": None}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": "user", "content": [{"type": "text"}]}],
                [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
                [{"role": "user", "content": "\ud800"}]):
        with pytest.raises(UsageError):
            t.render(bad)
    with pytest.raises(UsageError):
        t.render(CONVERSATION, tools={"name": "x"})
    # OpenAI's text parts are joined; the caller's messages are not changed.
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert t.render(parts) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(parts[0]["content"], list)


# --- choosing a template ---------------------------------------------------------------------------

def test_template_family_is_detected_from_its_text():
    assert detect_family("{{ '<|im_start|>' + m }}") == "chatml"
    assert detect_family("{{ bos_token + '[INST] ' + m + ' [/INST]' }}") == "llama-2"
    assert detect_family("{{ '[AVAILABLE_TOOLS] [' }}{{ '[INST] ' }}") == "mistral"
    assert detect_family("<|start_header_id|>{{ r }}<|end_header_id|>") == "llama-3"
    assert detect_family("<start_of_turn>{{ r }}") == "gemma"
    assert detect_family("<|assistant|>{{ c }}<|end|>") == "phi-3"
    assert detect_family("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert ChatTemplate("{{ messages[0].content }}").name == "custom"
    assert ChatTemplate("{{ messages[0].content }}").stop_strings == ()


@pytest.mark.parametrize("tokens, name, expected", [
    (["<|im_start|>", "<|im_end|>"], None, "chatml"),
    (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None, "llama-3"),
    (["<start_of_turn>", "<end_of_turn>"], None, "gemma"),
    (["<|user|>", "<|assistant|>", "<|end|>"], None, "phi-3"),
    (["[INST]", "[/INST]", "[TOOL_CALLS]"], None, "mistral"),
    ([], "Llama-2-7B-Chat", "llama-2"),
    ([], "Some Base Model", "chatml"),  # nothing to go by: chatml, as llama.cpp
])
def test_files_without_a_template_get_a_builtin(tokens, name, expected):
    meta, tok = spm_tokenizer(tokens, name)
    t = ChatTemplate.from_gguf(meta, tok)
    assert t.name == expected and t.is_builtin
    assert t.bos_token == "<s>" and t.eos_token == "</s>" and t.stop_token_ids == frozenset(tok.eog_ids)
    assert detect_builtin(tok.tokens, name, "llama") == expected


def test_a_file_template_that_names_a_builtin_is_that_builtin(fixtures):
    f = GGUFFile(fixtures / "llama-f32.gguf")  # a tiny model whose vocabulary has <|im_start|>, no template
    tok = Tokenizer.from_gguf_metadata(f.metadata)
    assert ChatTemplate.from_gguf(f.metadata, tok).name == "chatml"
    meta = {k: f.metadata[k] for k in f.metadata}
    meta["tokenizer.chat_template"] = "llama3"
    assert ChatTemplate.from_gguf(meta, tok).source == ChatTemplate.builtin("llama-3").source
    with pytest.raises(UsageError, match="unknown chat template"):
        ChatTemplate.builtin("vicuna")


def test_template_variables_and_the_tool_use_template():
    meta, tok = spm_tokenizer([])
    meta = {**meta, "tokenizer.chat_template": "{{ greeting }}{{ messages[0].content }}",
            "tokenizer.chat_template.tool_use": "{{ tools[0].function.name }}:{{ messages[0].content }}"}
    t = ChatTemplate.from_gguf(meta, tok)
    assert t.name == "custom" and t.render([{"role": "user", "content": "x"}], greeting="Hi ") == "Hi x"
    # Requests with tools get the file's tool_use template (as llama.cpp picks it).
    assert t.render([{"role": "user", "content": "x"}], tools=WEATHER) == "get_weather:x"


# --- the sandbox -----------------------------------------------------------------------------------

def _payloads(path):
    touch = f"touch {path}"
    return [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ self.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ ''|attr('__class__') }}",
        "{{ '{0.__class__}'.format(1) }}",
        f"{{{{ cycler.__init__.__globals__.os.system('{touch}') }}}}",
        f"{{{{ joiner.__init__.__globals__.os.popen('{touch}').read() }}}}",
        # CVE-2024-34359's payload (llama-cpp-python), pointed at our file
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
        f"{{{{x()._module.__builtins__['__import__']('os').popen(\"{touch}\")}}}}{{%endif%}}{{% endfor %}}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    ]


def test_templates_cannot_reach_python(tmp_path):
    path = tmp_path / "pwned"
    for payload in _payloads(path):
        with pytest.raises(TemplateError, match="sandbox forbids") as e:
            ChatTemplate(payload).render([{"role": "user", "content": "hi"}])
        assert type(e.value) is TemplateError and "untrusted" in str(e.value)
        assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, no chained traceback
    assert not path.exists()


@pytest.mark.parametrize("payload, why", [
    ("{% for i in range(10**10) %}x{% endfor %}", "MAX_RANGE"),
    ("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}", "steps"),
    ("{{ 'x' * 10**9 }}", "characters"),
    ("{{ 'x'|center(10**9) }}", "limit"),
    ("{{ 'x'.ljust(10**9) }}", "limit"),
    ("{{ '%999999999d' % 1 }}", "format width"),
    ("{{ '{:>999999999}'.format(1) }}", "format width"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "characters"),
    ("{% set x %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endset %}", "characters"),
    ("{% for i in range(100000) %}{{ 'z' * 1000 }}{% endfor %}", "characters"),
    ("{% set a = ['x' * 100000] %}{% set b = [a, a, a, a, a, a, a, a] %}{% set c = [b, b, b, b, b, b, b, b] %}"
     "{{ [c, c, c, c, c, c, c, c]|tojson }}", "larger"),
    # a structure holding one part many times: tiny in memory, 2**40 items written out (or compared)
    ("{% set ns = namespace(a=['x'], b=['x']) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
     "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}", "written out"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses"),
    ("{{ raise_exception('No tools here') }}", "refused the conversation: No tools here"),
    ("{% for %}", "syntax error on line 1"),
    ("{{ nothing.here }}", "UndefinedError"),
])
def test_templates_are_bounded_and_fail_as_one_error(payload, why):
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match=why):
        ChatTemplate(payload).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 3


def test_a_hostile_template_in_a_model_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "pwned"
    hostile = rewrite_gguf(FIXTURES / "llama-f32.gguf", tmp_path / "hostile.gguf",
                           meta={"tokenizer.chat_template": _payloads(path)[8]})
    llm = purelm.load(hostile, backend="numpy")
    with pytest.raises(TemplateError, match="sandbox forbids"):
        llm.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n")))
    code = main(["chat", str(hostile), "--backend", "numpy", "-n", "2"])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "sandbox forbids" in err and "Traceback" not in err
    assert not path.exists()


def test_real_templates_render_as_without_the_guards():
    # The guards must not change what a legitimate template writes: Qwen2.5-7B-Instruct's template (with
    # tools; as in llama.cpp's models/templates) against a plain transformers-style environment.
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    conv = CONVERSATION[:4] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abc123xyz", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "abc123xyz", "content": '{"temp": 20}'},
        {"role": "user", "content": "Thanks"}]
    expected = env.from_string(QWEN25).render(messages=validate_messages(conv), tools=WEATHER,
                                              add_generation_prompt=True)
    out = ChatTemplate(QWEN25).render(conv, tools=WEATHER)
    assert out == expected
    # The arguments (a JSON string in OpenAI's form) reach the template as the object it writes |tojson.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out
    assert "<tool_response>\n{\"temp\": 20}\n</tool_response>" in out


# --- tools -----------------------------------------------------------------------------------------

def test_tools_in_templates_without_tool_support():
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20 C"}]
    out = ChatTemplate.builtin("chatml").render(conv, tools=WEATHER)
    assert out.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER[0]) in out
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n20 C\n</tool_response><|im_end|>\n') in out
    # What the format asks the model to write reads back as the same call.
    reply = out.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls = parse_tool_calls(reply, WEATHER)
    assert content == "" and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_mistral_renders_tools_natively():
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "20 C"}]
    out = ChatTemplate.builtin("mistral", bos_token="<s>", eos_token="</s>").render(conv, tools=WEATHER)
    # Mistral-7B-Instruct-v0.3's layout: tools before the last user message, calls and results in brackets.
    assert out == ('<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": '
                   '"Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
                   '"required": ["city"]}}}][/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST][TOOL_CALLS] '
                   '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>'
                   '[TOOL_RESULTS] {"content": 20 C, "call_id": "abcDEF123"}[/TOOL_RESULTS]')


_FORMATS = [
    # Hermes / Qwen 2.5
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
     '{"x": 1}}</tool_call>', "Let me check.", [("a", {}), ("b", {"x": 1})]),
    ('<tool_call>\n{"name": "a", "arguments": {"q": "é"}}', "", [("a", {"q": "é"})]),  # cut at the end of turn
    # Mistral
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [("get_weather", {"city": "Paris"})]),
    ('Sure. [TOOL_CALLS][{"name": "a", "arguments": {}, "id": "abc123XYZ"}, {"name": "b", "arguments": {"y": [1]}}]',
     "Sure.", [("a", {}), ("b", {"y": [1]})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    # Llama 3.1-3.3
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", {"city": "Rome"})]),
    ('{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_weather", "parameters": {"city": "B"}}', "",
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
]


@pytest.mark.parametrize("text, content, calls", _FORMATS)
def test_tool_calls_are_read_from_each_format(text, content, calls):
    got_content, got = parse_tool_calls(text, WEATHER + [{"type": "function", "function": {"name": n}}
                                                         for n in ("a", "b")])
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    for c in got:
        assert c["type"] == "function" and isinstance(c["function"]["arguments"], str)
        if "[TOOL_CALLS]" in text:  # Mistral's templates want 9 alphanumerics back
            assert len(c["id"]) == 9 and c["id"].isalnum()
        else:
            assert c["id"].startswith("call_") and len(c["id"]) == 29
    if "abc123XYZ" in text:
        assert got[0]["id"] == "abc123XYZ"


@pytest.mark.parametrize("text", [
    "The weather is nice.",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": {"x": 1</tool_call>',
    "[TOOL_CALLS] [{\"name\": ",
    "[TOOL_CALLS]get_weather[ARGS]{broken",
    '{"name": "unknown_tool", "parameters": {}}',  # not one of the tools given
    '{"city": "Paris"}',  # JSON, but not a call
    '{"name": "get_weather", "parameters": {"city": "Paris"}} and then some text',
    "[" * 100000,
    '{"name": "get_weather", "arguments": "' + "[" * 100000 + "]" * 100000 + '"}',  # arguments nested too deeply
    "",
])
def test_malformed_tool_calls_stay_content(text):
    assert parse_tool_calls(text, WEATHER) == (text, [])


def test_tool_call_parsing_never_raises():
    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>", "{", "}", "[", "]",
              '"name"', '"arguments"', '"parameters"', ":", ",", '"a"', "1", " ", "\n", ";", "null", "é"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        content, calls = parse_tool_calls(text)
        assert isinstance(content, str) and isinstance(calls, list)


def test_a_stream_shows_the_content_of_a_reply_with_tools_and_never_a_call():
    """ContentStream over every format's replies (above) and random ones, cut into pieces anywhere:
    what it shows before the end, then `rest`, adds up to parse_tool_calls' content without its
    leading spaces (as the server gives a reply with tools), and never shows a call's text."""
    rng = random.Random(1)
    words = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "}", "[", " ", "\n", "<", "a",
             "Sure.", '{"name": "a", "arguments": {}}', '"parameters": {}', "tool", "_call>"]
    texts = [t for t, _, _ in _FORMATS] + ["The weather is nice.", "  Hi!", "a < b <tool", "x\n\n", "[1] first"]
    texts += ["".join(rng.choice(words) for _ in range(rng.randrange(1, 12))) for _ in range(300)]
    tools = WEATHER + [{"type": "function", "function": {"name": "a"}}]
    for text in texts:
        content, calls = parse_tool_calls(text, tools)
        for _ in range(5):
            shown, sent, at = ContentStream(), "", 0
            while at < len(text):
                n = rng.randrange(1, 6)
                sent += shown.add(text[at:at + n])
                at += n
            assert sent + shown.rest(content) == content.lstrip(), (text, sent)  # the server's content
            assert content.lstrip().startswith(sent), (text, sent)  # shown early: content's start, no markup


# --- long conversations ----------------------------------------------------------------------------

def test_fit_messages_drops_the_oldest_turns_after_the_system_prompt():
    def words(msgs):
        return sum(len(m["content"].split()) for m in msgs)

    conv = [{"role": "system", "content": "s s"}]
    for i in range(5):
        conv += [{"role": "user", "content": f"u{i} " * 3}, {"role": "assistant", "content": f"a{i} " * 3}]
    conv.append({"role": "user", "content": "last question"})
    assert fit_messages(conv, words, 100) == (conv, 0)
    kept, dropped = fit_messages(conv, words, 16)
    assert kept == conv[:1] + conv[7:] and dropped == 6 and words(kept) <= 16  # two turns of 6 words + 4
    kept, dropped = fit_messages(conv, words, 3)  # even the last turn does not fit: it is what comes back
    assert kept == [conv[0], conv[-1]] and dropped == 10
    no_system = conv[1:]
    kept, dropped = fit_messages(no_system, words, 14)
    assert kept[0]["role"] == "user" and kept == no_system[-5:] and dropped == 6


# --- llm.chat on SmolLM2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return purelm.load(smollm2_path, n_ctx=512)  # the default backend, as `purelm chat` uses


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_replies_and_stops_at_the_end_of_its_turn(smollm2):
    reply = smollm2.chat(QUESTION, max_tokens=48, temperature=0)
    assert reply.text.strip() and "Paris" in reply.text
    assert "<|im_end|>" not in reply.text and "<|im_start|>" not in reply.text
    assert reply.finish_reason == "stop" and reply.content == reply.text and reply.tool_calls == []
    assert reply.prompt_tokens == len(smollm2.chat_prompt(QUESTION))
    assert reply.completion_tokens == len(reply.tokens) + 1  # the end-of-turn token is generated too
    assert reply.message == {"role": "assistant", "content": reply.text}
    pieces = list(smollm2.stream_chat(QUESTION, max_tokens=48, temperature=0))
    assert "".join(c.text for c in pieces) == reply.text and pieces[-1].finish_reason == "stop"
    # The next turn extends the cached prompt: only the new tokens are evaluated.
    timings = {}
    follow = smollm2.chat(QUESTION + [reply.message, {"role": "user", "content": "And of Italy?"}],
                          max_tokens=48, temperature=0, timings=timings)
    assert follow.text.strip() and timings["prompt_eval_tokens"] < timings["prompt_tokens"] / 2


def test_chat_options_and_errors(smollm2):
    reply = smollm2.chat(QUESTION, max_tokens=3, temperature=0)
    assert reply.finish_reason == "length" and reply.completion_tokens == 3
    assert smollm2.chat(QUESTION, max_tokens=48, temperature=0, stop=["capital"]).text == "The "
    with pytest.raises(UsageError):
        smollm2.chat([{"role": "user"}])
    with pytest.raises(UsageError):
        smollm2.chat(QUESTION, chat_template_kwargs=["x"])
    with pytest.raises(UsageError):
        smollm2.chat(QUESTION, bogus=1)
    with pytest.raises(purelm.ContextOverflowError):
        smollm2.chat([{"role": "user", "content": "word " * 600}], max_tokens=4)
    # The tools go into the prompt (SmolLM2's template knows none: the Hermes format is added).
    prompt = smollm2.chat_template.render(QUESTION, tools=WEATHER)
    assert "<tools>" in prompt and "get_weather" in prompt
    reply = smollm2.chat(QUESTION, tools=WEATHER, max_tokens=48, temperature=0)
    assert reply.finish_reason in ("stop", "tool_calls", "length")
    assert (reply.content, reply.tool_calls) == parse_tool_calls(reply.text, WEATHER)


def test_chat_template_can_be_replaced(smollm2_path):
    llm = purelm.load(smollm2_path, n_ctx=128)
    own = llm.chat_template
    assert own is llm.chat_template and own.name == "chatml"  # built once
    llm.chat_template = "llama-3"
    assert llm.chat_template.name == "llama-3" and llm.chat_template.is_builtin
    assert llm.chat_template.bos_token == "<|im_start|>"  # the file's BOS text
    llm.chat_template = own
    assert llm.chat_template is own
    with pytest.raises(UsageError):
        llm.chat_template = 3
    with pytest.raises(UsageError):
        llm.chat_template = "nope"


# --- purelm chat -----------------------------------------------------------------------------------

def test_cli_chat_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "/save" in out and "/load" in out and "--system" in out
    for bad in (["-n", "0"], ["--seed", "-2"], ["--temp", "-1"], ["-c", "0"], ["-m", "a.gguf", "b.gguf"],
                ["--lookup", "0"], ["--lookup", "4", "--draft", "d.gguf"]):
        assert main(["chat", *bad]) == 2  # refused before any model is loaded
        assert capsys.readouterr().err.count("\n") == 1


def chat_cli(*args, input=b"", timeout=120):
    return subprocess.run([sys.executable, "-m", "purelm.cli", "chat", *map(str, args)], input=input,
                          capture_output=True, cwd=ROOT, timeout=timeout)


def test_cli_chat_piped_replies_as_the_api(smollm2_path, smollm2, tmp_path):
    saved = tmp_path / "conv.json"
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "24",
                 input=f"What is the capital of France?\n\n/save {saved}\nAnd of Germany?\n".encode())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    first = smollm2.chat(QUESTION, max_tokens=24, temperature=0)
    assert len(lines) == 2 and lines[0] == first.text and "Berlin" in lines[1]
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "24", "--lookup", "8",  # speculative: the same replies
                 input=b"What is the capital of France?\n\nAnd of Germany?\n")
    assert r.returncode == 0 and r.stdout.decode().splitlines() == lines, r.stderr
    assert json.loads(saved.read_text()) == QUESTION + [first.message]
    # /load continues the saved conversation; /reset starts over; /exit leaves.
    again = tmp_path / "again.json"
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "24",
                 input=f"/load {saved}\nAnd of Germany?\n/save {again}\n/reset\n/save {tmp_path / 'empty.json'}\n"
                       f"/exit\nnot read\n".encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [lines[1]]  # the same reply as in the uninterrupted chat
    conv = json.loads(again.read_text())
    assert conv[:2] == QUESTION + [first.message] and conv[2:] == [
        {"role": "user", "content": "And of Germany?"}, {"role": "assistant", "content": lines[1]}]
    assert json.loads((tmp_path / "empty.json").read_text()) == []
    r = chat_cli(smollm2_path, input=f"/load {tmp_path / 'missing.json'}\n".encode())
    assert r.returncode == 1 and b"missing.json" in r.stderr and b"Traceback" not in r.stderr
    model = tmp_path / "tiny.gguf"  # /save never writes over the model it talks to
    model.write_bytes((FIXTURES / "llama-q8_0.gguf").read_bytes())
    r = chat_cli(model, "-n", "2", input=f"Hi\n/save {model}\n".encode())
    assert r.returncode == 1 and b"it is the model file" in r.stderr
    assert model.read_bytes() == (FIXTURES / "llama-q8_0.gguf").read_bytes()
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's stack
    r = chat_cli(smollm2_path, input=f"/load {tmp_path / 'deep.json'}\n".encode())
    assert r.returncode == 1 and b"nested too deeply" in r.stderr and b"Traceback" not in r.stderr


def test_cli_chat_with_a_json_schema_replies_as_the_api(smollm2_path, smollm2):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 30}},
              "required": ["greeting"], "additionalProperties": False}
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "40", "-j", json.dumps(schema), input=b"Hi there\n")
    assert r.returncode == 0, r.stderr
    want = smollm2.chat([{"role": "user", "content": "Hi there"}], json_schema=schema, max_tokens=40, temperature=0)
    assert r.stdout.decode() == want.text + "\n" and set(json.loads(want.text)) == {"greeting"}


def test_cli_chat_with_a_template_file_replies_as_the_api_with_that_template(smollm2_path, smollm2, tmp_path, capsys):
    text = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    (tmp_path / "t.jinja").write_text(text)
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "12", "--chat-template-file", tmp_path / "t.jinja",
                 input=b"What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    own = smollm2.chat_template
    try:
        smollm2.chat_template = ChatTemplate.from_text(text, smollm2.tokenizer)
        want = smollm2.chat(QUESTION, max_tokens=12, temperature=0).text
    finally:
        smollm2.chat_template = own
    assert r.stdout.decode() == want + "\n" and want != smollm2.chat(QUESTION, max_tokens=12, temperature=0).text
    (tmp_path / "bad.jinja").write_text("{% for %}")
    from purelm.cli import main

    code = main(["chat", "-m", str(tmp_path / "none.gguf"), "--chat-template-file", str(tmp_path / "bad.jinja")])
    out, err = capsys.readouterr()  # refused before the model (there is none) is read
    assert code == 1 and out == "" and err.startswith("purelm: error:") and "template" in err, err
    assert err.count("\n") == 1, err


def test_cli_chat_keeps_going_past_the_context(smollm2_path):
    questions = ["Name a color.", "Name an animal.", "Name a fruit.", "Name a city.", "Name a number.", "Say hi."]
    r = chat_cli(smollm2_path, "--temp", "0", "-n", "12", "-c", "112", "--system", "Answer with one word.",
                 input="".join(q + "\n" for q in questions).encode())
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.decode().splitlines()) == len(questions)
    assert r.stderr.decode().count("longer than the context") == 1


def test_cli_chat_ctrl_c_stops_a_reply_and_then_leaves(smollm2_path):
    p = subprocess.Popen([sys.executable, "-m", "purelm.cli", "chat", str(smollm2_path), "--temp", "0", "-n", "1500",
                          "-c", "2048"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        p.stdin.write(b"Write a very long story about a dragon.\n")
        p.stdin.flush()
        assert os.read(p.stdout.fileno(), 4096)  # the reply is streaming
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)  # stops the reply, not the chat
        p.stdin.write(b"What is the capital of France?\n")
        p.stdin.flush()
        rest = b""
        while not re.search(rb"Paris[^\n]*\n", rest):  # the next reply, whole
            chunk = os.read(p.stdout.fileno(), 4096)
            assert chunk, p.stderr.read()
            rest += chunk
        assert time.monotonic() - t0 < 30
        p.send_signal(signal.SIGINT)  # at the prompt: leaves, cleanly
        assert p.wait(30) == 0
        assert b"Traceback" not in p.stderr.read()
    finally:
        p.kill()
        p.wait()


QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
