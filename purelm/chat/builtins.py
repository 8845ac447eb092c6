"""The built-in chat templates (each family's upstream Hugging Face template), their names and
aliases, the texts that end a turn in each family, and the detection of a template's family: by its
text, or, for a file without a template, by the tokens of its vocabulary (as llama.cpp's
`llm_chat_detect_template` in src/llama-chat.cpp; chatml when nothing matches)."""
from __future__ import annotations

import re
from collections.abc import Iterable

# --- built-in templates ----------------------------------------------------------------------------
# Each is the upstream Hugging Face template of the family (the `chat_template` of the named model's
# tokenizer_config.json), so that a file without a template renders as the original model expects.

# llama.cpp's CHATML_TEMPLATE_SRC (common/chat.cpp) and teknium/OpenHermes-2.5-Mistral-7B.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf.
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct.
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# google/gemma-3-1b-it: a system message opens the first user turn (Gemma has no system role).
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# microsoft/Phi-3.5-mini-instruct (llama.cpp's models/templates/microsoft-Phi-3.5-mini-instruct.jinja).
PHI_3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.3 (Mistral's "v3" template, with tools; as in llama.cpp's
# tests/test-chat-template.cpp). The system message opens the last user turn.
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML, "llama-2": LLAMA_2, "llama-3": LLAMA_3, "gemma": GEMMA, "phi-3": PHI_3, "mistral": MISTRAL,
}
_ALIASES = {"llama2": "llama-2", "llama3": "llama-3", "phi3": "phi-3", "mistral-v3": "mistral", "gemma2": "gemma",
            "gemma3": "gemma"}

# Texts that end an assistant turn in each family: a reply stops there even where the vocabulary has
# no such token (a built-in template on a model that was not trained on it), or does not mark it as
# an end of generation.
TURN_ENDS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>",), "llama-2": ("</s>",), "llama-3": ("<|eot_id|>", "<|eom_id|>"),
    "gemma": ("<end_of_turn>",), "phi-3": ("<|end|>",), "mistral": ("</s>",),
}


def canonical_name(name: str) -> str | None:
    """The built-in template's name for `name` (or an alias of it), else None."""
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in BUILTIN_TEMPLATES else None


def detect_family(source: str) -> str | None:
    """The built-in family a template's text belongs to, by llama.cpp's rules
    (`llm_chat_detect_template`), restricted to the families built in here; None for others."""
    named = canonical_name(source) if len(source) < 32 else None
    if named:
        return named
    if "<|im_start|>" in source:
        return "chatml"
    if source.startswith("mistral") or "[INST]" in source:
        if "[SYSTEM_PROMPT]" in source or "' [INST] ' + system_message" in source or "[AVAILABLE_TOOLS]" in source:
            return "mistral"
        return "llama-2"
    if "<|assistant|>" in source and "<|end|>" in source:
        return "phi-3"
    if "<start_of_turn>" in source:
        return "gemma"
    if "<|start_header_id|>" in source and "<|end_header_id|>" in source:
        return "llama-3"
    return None


def detect_builtin(tokens: Iterable[str], general_name: str | None = None, vocab_model: str | None = None) -> str:
    """The built-in template for a file without one. llama.cpp falls back to chatml; this looks first
    for the special tokens each family's turns are made of (in the order of llama.cpp's detection by
    template text), so that a Llama 3, Gemma, Phi-3 or Mistral file is talked to in its own format."""
    vocab = set(tokens)
    if "<|im_start|>" in vocab:
        return "chatml"
    if "[INST]" in vocab:
        return "mistral"
    if "<|assistant|>" in vocab and "<|end|>" in vocab:
        return "phi-3"
    if "<start_of_turn>" in vocab:
        return "gemma"
    if "<|start_header_id|>" in vocab and "<|end_header_id|>" in vocab:
        return "llama-3"
    name = (general_name or "").lower()
    if vocab_model == "llama" and re.search(r"llama[- _]?2", name) and "chat" in name:
        return "llama-2"  # Llama 2 chat has no special turn tokens: only its name tells
    return "chatml"
