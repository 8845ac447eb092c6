"""The Python API: `purelm.load(path_or_name)` and what a loaded model can do."""
from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from . import speculative
from .backends import BACKENDS, get_backend
from .backends.base import Backend
from .backends import kv_cache
from .backends.kv_cache import check_cache_type
from .chat import ChatCompletion, ChatTemplate, parse_tool_calls
from .formats.ggml_legacy import open_model_file
from .errors import ContextOverflowError, FormatError, MemoryLimitError, UsageError
from .generate import Chunk, Completion, prefill, stream_batch, stream_tokens, truncate_prompt
from .grammar import Constraint, compile_grammar, forced_call
from .hub import resolve
from .infill import infill_ids
from .lora import adapter_list, check_scale, load_adapter
from .models import build_model
from .sampling import SamplingParams, check_int
from .tokenizer import Tokenizer

DEFAULT_CTX = 4096
_SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


def _check_load_args(backend: object, n_ctx: object, threads: object) -> None:
    if not (backend is None or isinstance(backend, Backend) or backend in BACKENDS):
        raise UsageError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, a Backend or None, "
                         f"got {backend!r}")
    if n_ctx is not None:
        check_int("n_ctx", n_ctx, 1, ">= 1, or None for min(the model's, 4096)")
    if threads is not None:
        check_int("threads", threads, 1, ">= 1, or None for every core")


def _token_ids(ids: object, limit: int, name: str, text_ok: bool = False) -> list[int]:
    """`ids` as a list of ints in [0, limit), else a UsageError naming `name`."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        what = "a str or a list of token ids" if text_ok else "a list of token ids"
        raise UsageError(f"{name} must be {what}, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < limit:
            raise UsageError(f"{name}: {i!r} is not a token id (whole numbers in [0, {limit}))")
    return [int(i) for i in out]


def _text(text: object, name: str) -> str:
    if not isinstance(text, str):
        raise UsageError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. undecodable bytes kept by surrogateescape
        raise UsageError(f"{name} is not valid Unicode: {e.reason} at index {e.start} "
                         "(decode bytes with errors='replace')") from None
    return text


def _stops(stop: object) -> list[str]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else \
        list(stop) if isinstance(stop, Iterable) else None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise UsageError(f"stop must be a str or a list of str, got {stop!r}")
    return stops


def _generation_options(max_tokens: object, stop: object, sampling: dict,
                        n_vocab: int | None = None) -> tuple[int, list[str], SamplingParams]:
    """The options every generation call takes, checked: max_tokens, stop strings, sampling (with
    `n_vocab`, the logit bias's token ids too)."""
    unknown = set(sampling).difference(_SAMPLING_KEYS)
    if unknown:
        raise UsageError(f"unknown generation option(s): {', '.join(sorted(unknown))} (known: max_tokens, "
                         f"stop, ignore_eos, timings, truncate, lookup, draft, grammar, json_schema, "
                         f"{', '.join(_SAMPLING_KEYS)}; chat: tools, tool_choice, chat_template_kwargs)")
    params = SamplingParams(**sampling)
    params.validate()
    if n_vocab is not None:
        params.check_bias_ids(n_vocab)
    return check_int("max_tokens", max_tokens, 1), _stops(stop), params


class LLM:
    """A loaded model: its file, tokenizer, backend and one KV cache reused across calls (a prompt that
    extends the previous one is not evaluated again)."""

    def __init__(self, path: str | os.PathLike, backend: str | Backend | None = None,
                 n_ctx: int | None = None, threads: int | None = None, device: str | None = None,
                 dtype: str | None = None, cache_type_k: str = "f32", cache_type_v: str = "f32",
                 lora: Sequence[Any] = ()) -> None:
        _check_load_args(backend, n_ctx, threads)
        lora = adapter_list(lora)
        check_cache_type("cache_type_k", cache_type_k), check_cache_type("cache_type_v", cache_type_v)
        self.path = str(path)
        self.file = open_model_file(path)  # GGUF, or a legacy ggml/ggmf/ggjt file
        if not self.file.tensors:  # llama.cpp's ggml-vocab-*.gguf: readable, but nothing to run
            raise FormatError(self.path, "tensors", "none: a vocabulary-only file can tokenize "
                              "(purelm tokenize, purelm.tokenizer.Tokenizer.from_file) but not run")
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, threads, device, dtype)
        # LoRA adapters (llama.cpp's --lora / --lora-scaled), each checked against this model
        self.adapters = []
        try:
            for path, scale in lora:
                self.adapters.append(load_adapter(path, self.file, scale))
            self.model = build_model(self.file, self.backend, self.adapters)
        except BaseException:
            for adapter in self.adapters:
                adapter.file.close()
            raise
        self.model.cache_type_k, self.model.cache_type_v = cache_type_k, cache_type_v  # every cache it makes
        self.tokenizer = Tokenizer.from_gguf_metadata(self.file.metadata, path=self.file.path)
        self.n_ctx = n_ctx or min(self.model.n_ctx_train, DEFAULT_CTX)
        self.cache = self.model.new_cache(self.n_ctx)
        self._draft: tuple[Any, LLM] | None = None  # the draft model a `draft=` path loaded

    # -- tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(_text(text, "text"), add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(_token_ids(ids, self.tokenizer.vocab_size, "ids"), skip_special=skip_special)

    @property
    def n_vocab(self) -> int:
        """Rows of the model's embedding: the ids the model accepts (at least the tokenizer's)."""
        return getattr(self.model, "n_vocab", self.tokenizer.vocab_size)

    # -- logits
    def logits(self, ids: Sequence[int] | str) -> np.ndarray:
        """Float32 logits of every position, shape (len(ids), vocab), from a fresh context."""
        ids = self.tokenize(ids) if isinstance(ids, str) else _token_ids(ids, self.n_vocab, "ids", text_ok=True)
        if not ids:
            raise UsageError("ids is empty: give at least one token")
        need, free = 4 * len(ids) * self.n_vocab, kv_cache.available_memory()  # the float32 logits alone
        if free is not None and need > free:
            raise MemoryLimitError(f"the logits of {len(ids)} positions take {need / 2**30:.1f} GiB, and "
                                   f"{free / 2**30:.1f} GiB of memory is available: ask for fewer positions at a time")
        cache = self.model.new_cache(max(self.n_ctx, len(ids)))
        return prefill(self.model, cache, list(ids), all_logits=True)

    # -- generation
    def stream_chunks(self, prompt: str | Sequence[int], max_tokens: int = 256, stop: Sequence[str] = (),
                      ignore_eos: bool = False, timings: dict | None = None, truncate: bool = False,
                      lookup: int | None = None, draft: "str | os.PathLike | LLM | None" = None,
                      grammar: str | None = None, json_schema: dict | None = None,
                      **sampling: Any) -> Iterator[Chunk]:
        """Chunks of generated text with their tokens; the last chunk carries the finish reason.

        `sampling`: the fields of `SamplingParams` (temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, frequency_penalty, presence_penalty, seed, top_n_sigma, typical_p, xtc_probability,
        xtc_threshold, mirostat, mirostat_tau, mirostat_eta, dry_multiplier, dry_base, dry_allowed_length,
        dry_penalty_last_n, dry_sequence_breakers, logit_bias: {token id: added to its logit}). `stop`:
        a string or a list of them.
        `truncate`: drop the start of a prompt that leaves no room for `max_tokens` new tokens, keeping
        its last n_ctx - max_tokens tokens (at least 1), or half the context when max_tokens >= n_ctx;
        without it a prompt that does not fit raises `ContextOverflowError`.
        Speculative decoding (the same greedy output, the same distribution when sampling; see
        purelm.speculative): `lookup=N` drafts up to N tokens a step from the prompt and the text so
        far; `draft` (a path, a known name or an LLM sharing this model's vocabulary) drafts with a
        smaller model. Structured output (purelm.grammar; needs llguidance): `json_schema` (a dict) or
        `grammar` (llama.cpp's GBNF text) allows only the tokens that keep the reply inside it, and the
        reply ends where it does. Bad arguments raise `UsageError`."""
        return self._stream_chunks(prompt, self._constraint(grammar, json_schema), max_tokens, stop, ignore_eos,
                                   timings, truncate, lookup, draft, sampling)

    def _stream_chunks(self, prompt: str | Sequence[int], constraint: Any, max_tokens: int, stop: Sequence[str],
                       ignore_eos: bool, timings: dict | None, truncate: bool, lookup: int | None, draft: Any,
                       sampling: dict) -> Iterator[Chunk]:
        max_tokens, stops, params = _generation_options(max_tokens, stop, sampling, self.n_vocab)
        drafter, n_draft = self._drafter(lookup, draft)
        ids = self._prompt_ids(prompt)
        if truncate:
            ids = truncate_prompt(ids, self.n_ctx, max_tokens)
        return stream_tokens(self.model, self.tokenizer, self.cache, ids, params, max_tokens, stops,
                             ignore_eos, timings, drafter, n_draft, constraint() if constraint else None)

    def _constraint(self, grammar: object, json_schema: object, call: tuple | None = None) -> Any:
        """A function that makes a Constraint of the grammar asked for (compiled once), or None.
        `call`: a chat's forced tool call, (format, tools, name, several) as grammar.forced_call takes them."""
        asked = [(k, v) for k, v in (("gbnf", grammar), ("json_schema", json_schema), ("call", call)) if v is not None]
        if not asked:
            return None
        if len(asked) > 1:
            raise UsageError("give one of grammar and json_schema (a chat's forced tool call is a grammar too)")
        kind, value = asked[0]
        if kind == "call":
            compiled = forced_call(self.tokenizer, *value)
        else:
            compiled = compile_grammar(self.tokenizer, kind, value)
        return lambda: Constraint(self.tokenizer, compiled)

    def _drafter(self, lookup: object, draft: object) -> tuple[Any, int]:
        """The drafter `lookup` / `draft` ask for, and the most tokens it may draft per step."""
        if lookup is not None and draft is not None:
            raise UsageError("give lookup or draft, not both")
        if lookup is not None:
            return speculative.LookupDrafter(), min(check_int("lookup", lookup, 1), speculative.max_drafts(self.model))
        if draft is None:
            return None, 0
        if isinstance(draft, (str, os.PathLike)):
            if self._draft is None or self._draft[0] != draft:  # loaded once, kept for the next calls
                self._draft = (draft, LLM(resolve(draft), backend=self.backend, n_ctx=self.n_ctx,
                                                 cache_type_k=self.model.cache_type_k,
                                                 cache_type_v=self.model.cache_type_v))
            draft = self._draft[1]
        if not isinstance(draft, LLM) or draft is self:  # itself: both would write into one cache
            raise UsageError(f"draft must be a model path, a known name or another LLM, got {type(draft).__name__}")
        speculative.check_draft_vocabulary(self.tokenizer, draft.tokenizer, draft.path)
        return (speculative.ModelDrafter(draft.model, draft.cache),
                min(speculative.DRAFT_MAX, speculative.max_drafts(self.model)))

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenize(prompt) if isinstance(prompt, str) else _token_ids(prompt, self.n_vocab, "prompt", True)

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Generated text, piece by piece, as it is produced."""
        for chunk in self.stream_chunks(prompt, **kwargs):
            if chunk.text:
                yield chunk.text

    def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        timings: dict[str, float] = {}
        texts, tokens, reason = [], [], "length"
        for chunk in self.stream_chunks(prompt, timings=timings, **kwargs):
            texts.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
            reason = chunk.finish_reason or reason
        return Completion("".join(texts), tokens, reason, int(timings.get("prompt_tokens", 0)), timings)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The generated text (see `stream_chunks` for the options)."""
        return self.complete(prompt, **kwargs).text

    def infill(self, prefix: str, suffix: str, extra: Sequence[tuple[str, str]] = (), **kwargs: Any) -> str:
        """The text a code model writes between `prefix` and `suffix` (fill in the middle), the prompt
        built as llama-server's `/infill` builds it (purelm.infill); `extra` files as (name, text)
        before it. The model needs FIM tokens (a UsageError says which are missing). Options as
        `generate`'s."""
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str):
                raise UsageError(f"{name} must be a string, got {type(value).__name__}")
        if not all(isinstance(e, (tuple, list)) and len(e) == 2 and all(isinstance(x, str) for x in e)
                   for e in extra):
            raise UsageError("extra must be (filename, text) pairs of strings")
        return self.generate(infill_ids(self.tokenizer, prefix, suffix, extra=list(extra), n_ctx=self.n_ctx), **kwargs)

    def stream_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, max_tokens: int = 256,
                     stop: Sequence[str] = (), ignore_eos: bool = False, timings: dict | None = None,
                     grammar: str | None = None, json_schema: dict | None = None,
                     **sampling: Any) -> Iterator[tuple[int, Chunk]]:
        """`n` continuations of each prompt, generated together (one forward pass per step for all of
        them): yields (index, chunk) with index = prompt * n + sample j, in the order they are made; a
        sequence's last chunk carries its finish reason. Options as in `stream_chunks`; with a seed,
        sample j of every prompt uses seed + j (as a single `generate` with that seed would). The
        samples of a prompt share its cached positions."""
        max_tokens, stops, params = _generation_options(max_tokens, stop, sampling, self.n_vocab)
        constraint = self._constraint(grammar, json_schema)
        n = check_int("n", n, 1)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise UsageError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        ids = [self._prompt_ids(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise UsageError(f"prompt {i} is empty: give at least one token")
            if len(p) >= self.n_ctx:
                raise ContextOverflowError(f"prompt {i} has {len(p)} tokens but the context holds {self.n_ctx}")
        return stream_batch(self.model, self.tokenizer, self.n_ctx, ids, n, params, max_tokens, stops,
                            ignore_eos, timings, constraint)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, **kwargs: Any) -> list[Completion]:
        """Completions of every prompt, `n` each (prompt 0's n samples first), generated together."""
        timings = kwargs.pop("timings", None)
        timings = timings if timings is not None else {}
        if isinstance(prompts, Iterable) and not isinstance(prompts, (str, bytes)):
            prompts = list(prompts)  # a generator or an array: read once, here
        n_prompts = len(prompts) if isinstance(prompts, list) else 0
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        reasons: dict[int, str] = {}
        for index, chunk in self.stream_batch(prompts, n, timings=timings, **kwargs):
            texts.setdefault(index, []).append(chunk.text)
            if chunk.token is not None:
                tokens.setdefault(index, []).append(chunk.token)
            if chunk.finish_reason:
                reasons[index] = chunk.finish_reason
        prompt_tokens = [len(p) if not isinstance(p, str) else len(self.tokenize(p)) for p in prompts]
        return [Completion("".join(texts.get(i, [])), tokens.get(i, []), reasons.get(i, "length"),
                           prompt_tokens[i // n], timings) for i in range(n_prompts * n)]

    # -- embeddings
    def embed(self, texts: str | Sequence[str], pooling: str | None = None) -> np.ndarray:
        """Embeddings of `texts`: the final hidden states pooled over each text's tokens (special
        tokens included) and L2-normalized, as llama.cpp's `--embeddings`. `pooling`: "mean", "cls"
        (the first token) or "last"; by default the one the file names (`{arch}.pooling_type`), else
        "mean". A str gives shape (n_embd,), a list of str (len(texts), n_embd); float32. A text
        longer than the context raises `ContextOverflowError`."""
        from .embeddings import check_pooling, embed_many

        check_pooling(pooling)

        single = isinstance(texts, str)
        if not single and (isinstance(texts, bytes) or not isinstance(texts, Iterable)):
            raise UsageError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        items = [texts] if single else list(texts)
        ids = [self.tokenize(_text(t, f"texts[{i}]")) for i, t in enumerate(items)]
        out = embed_many(self.model, self.cache, ids, pooling=pooling)
        return out[0] if single else out

    def rerank(self, query: str, documents: Sequence[str]) -> list[float]:
        """Each document's relevance to `query` by a reranker (a cross-encoder: an encoder with a
        classification head, e.g. a RobertaForSequenceClassification converted by `purelm convert`):
        the query and the document joined as llama.cpp's reranking joins them (Tokenizer.encode_pair),
        the head's first score over the first token. Higher is more relevant; raw scores, not
        probabilities."""
        from .embeddings import rank_many

        query = _text(query, "query")
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Iterable):
            raise UsageError(f"documents must be a list of str, got {type(documents).__name__}")
        ids = self.tokenizer.encode_pairs(query, [_text(d, f"documents[{i}]") for i, d in enumerate(documents)])
        return [float(s[0]) for s in rank_many(self.model, self.cache, ids)]

    # -- chat
    @property
    def chat_template(self) -> ChatTemplate:
        """The model's chat template (`purelm.chat.ChatTemplate`): the file's `tokenizer.chat_template`,
        rendered in a sandbox, or for a file without one a built-in chosen as llama.cpp chooses. Assign
        a built-in's name ("chatml", "llama-2", "llama-3", "gemma", "phi-3", "mistral") or a
        ChatTemplate to use another."""
        template = self.__dict__.get("_chat_template")
        if template is None:
            template = self.__dict__["_chat_template"] = ChatTemplate.from_gguf(self.file.metadata, self.tokenizer)
        return template

    @chat_template.setter
    def chat_template(self, template: str | ChatTemplate) -> None:
        if isinstance(template, str):
            template = ChatTemplate.builtin(template, self.tokenizer)
        elif not isinstance(template, ChatTemplate):
            raise UsageError(f"chat_template must be a built-in template's name or a ChatTemplate, "
                             f"got {type(template).__name__}")
        self.__dict__["_chat_template"] = template

    def chat_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                    chat_template_kwargs: dict | None = None) -> list[int]:
        """The token ids of `messages` as the chat template writes them, ending where the assistant's
        reply starts. `tools`: OpenAI-style tool definitions; `chat_template_kwargs`: more template
        variables (e.g. {"enable_thinking": False})."""
        if chat_template_kwargs is None:
            chat_template_kwargs = {}
        if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
            raise UsageError(f"chat_template_kwargs must be a dict of str keys, got {chat_template_kwargs!r:.80}")
        return self.chat_template.apply(messages, tools=tools, **chat_template_kwargs)

    def stream_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                    chat_template_kwargs: dict | None = None, stop: str | Sequence[str] = (),
                    tool_choice: str | dict | None = None, grammar: str | None = None,
                    json_schema: dict | None = None, max_tokens: int = 256, ignore_eos: bool = False,
                    timings: dict | None = None, truncate: bool = False, lookup: int | None = None,
                    draft: "str | os.PathLike | LLM | None" = None, parallel_tool_calls: bool = True,
                    **sampling: Any) -> Iterator[Chunk]:
        """The assistant's reply to `messages` (a list of {"role": ..., "content": ...}), chunk by chunk
        as in `stream_chunks` (same options); it stops at the end of the turn (the vocabulary's end
        tokens, the template's end-of-turn texts, and `stop`). `tool_choice` (OpenAI's): "auto" (the
        default), "none" (the tools left out), "required" or {"type": "function", "function": {"name":
        ...}}: the reply is a call (of that function), in the format the template shows the model, its
        arguments following the tool's parameters schema (a grammar: needs llguidance); "required" allows
        several calls unless `parallel_tool_calls` is False, a named function one. A prompt that
        extends the previous one (the same conversation, one turn later) is not evaluated again. A
        malformed message raises UsageError, a template that fails TemplateError."""
        forced = None
        if not isinstance(parallel_tool_calls, bool):
            raise UsageError(f"parallel_tool_calls must be True or False, got {parallel_tool_calls!r:.80}")
        if tool_choice == "required" or isinstance(tool_choice, dict):
            fn = tool_choice.get("function") if isinstance(tool_choice, dict) else {}
            name = fn.get("name") if isinstance(fn, dict) else None
            if not tools or (isinstance(tool_choice, dict) and not isinstance(name, str)):
                raise UsageError("tool_choice asks for a call: give tools, and a function's name "
                                 "({'type': 'function', 'function': {'name': ...}})")
            forced = (self.chat_template.call_format, list(tools), name, name is None and parallel_tool_calls)
        elif tool_choice not in (None, "auto", "none"):
            raise UsageError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {tool_choice!r:.80}")
        ids = self.chat_prompt(messages, None if tool_choice == "none" else tools, chat_template_kwargs)
        return self._stream_chunks(ids, self._constraint(grammar, json_schema, forced), max_tokens,
                                   [*self.chat_template.stop_strings, *_stops(stop)], ignore_eos, timings,
                                   truncate, lookup, draft, sampling)

    def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
             chat_template_kwargs: dict | None = None, **kwargs: Any) -> ChatCompletion:
        """The assistant's reply to `messages` (options as in `stream_chat`): a `ChatCompletion` with
        the text, the tool calls read from it when `tools` were given (content without them), the finish
        reason ("stop", "length" or "tool_calls") and token counts. `.message` is the reply as a message
        to append to the conversation."""
        timings = kwargs.pop("timings", None)
        timings = timings if timings is not None else {}
        if kwargs.get("tool_choice") == "none":  # the tools were left out: nothing to read calls of
            tools = None
        texts, tokens, reason = [], [], "length"
        for chunk in self.stream_chat(messages, tools, chat_template_kwargs, timings=timings, **kwargs):
            texts.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
            reason = chunk.finish_reason or reason
        text = "".join(texts)
        content, calls = parse_tool_calls(text, tools) if tools else (text, [])
        if kwargs.get("parallel_tool_calls") is False:
            calls = calls[:1]
        return ChatCompletion(text, content, calls, "tool_calls" if calls else reason,
                              int(timings.get("prompt_tokens", 0)), int(timings.get("generated_tokens", len(tokens))),
                              tokens, timings)

    def reset(self) -> None:
        """Forget the cached context."""
        self.cache.truncate(0)

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """New scales for the LoRA adapters loaded with the model (`lora=`), one per adapter in their
        order (0 turns one off); the cached context, made with the old scales, is forgotten."""
        if not isinstance(scales, (list, tuple)) or len(scales) != len(self.adapters):
            raise UsageError(f"scales must be a list of {len(self.adapters)} numbers, one per LoRA adapter, "
                             f"got {scales!r}")
        checked = [check_scale(f"scales[{i}]", v) for i, v in enumerate(scales)]
        for adapter, scale in zip(self.adapters, checked):
            adapter.scale = scale
        self.reset()

    # -- sessions (purelm/session.py)
    def save_session(self, path: str | os.PathLike, messages: list | None = None) -> None:
        """Write the cached context (tokens, keys and values, the last prompt's logits) to `path`, with
        `messages` (a chat's, any JSON) beside it. A later process that loads it goes on exactly as this
        one would: a prompt that extends the saved tokens evaluates only what is new."""
        from .session import save

        save(self, path, messages)

    def load_session(self, path: str | os.PathLike) -> Any:
        """Replace the cached context by the one saved in `path` (by this model, with the same cache
        types); returns the messages saved with it (None if none)."""
        from .session import load

        return load(self, path)

    @property
    def metadata(self):
        return self.file.metadata


def load(path_or_name: str | os.PathLike | None = None, backend: str | Backend | None = None,
         n_ctx: int | None = None, threads: int | None = None, device: str | None = None,
         dtype: str | None = None, cache_type_k: str = "f32", cache_type_v: str = "f32",
         lora: Sequence[Any] = ()) -> LLM:
    """Open a GGUF file or a legacy ggml/ggmf/ggjt one (or a known model's name, pulled on first use;
    None: the default model). `backend`: "numba", "numpy", "torch" or None (the fastest CPU backend);
    `device` ("cuda", "cuda:N", "cpu") and `dtype` ("bf16", "fp16", "fp32") are the torch backend's.
    `cache_type_k`, `cache_type_v`: how the KV cache stores keys and values, "f32", "f16" (half the
    bytes) or "q8_0" (about a quarter; numba and numpy backends), as llama.cpp's --cache-type-k/-v.
    `lora`: LoRA adapter files (llama.cpp's GGUF adapters), each a path (scale 1) or (path, scale),
    applied to every reply as llama.cpp's --lora / --lora-scaled do (purelm.lora).
    Bad arguments raise `UsageError`; a bad file `FormatError`."""
    if not (path_or_name is None or isinstance(path_or_name, (str, os.PathLike))):
        raise UsageError(f"path_or_name must be a path, a model name or None, got {type(path_or_name).__name__}")
    _check_load_args(backend, n_ctx, threads)
    check_cache_type("cache_type_k", cache_type_k), check_cache_type("cache_type_v", cache_type_v)
    return LLM(resolve(path_or_name), backend=backend, n_ctx=n_ctx, threads=threads, device=device, dtype=dtype,
               cache_type_k=cache_type_k, cache_type_v=cache_type_v, lora=adapter_list(lora))
