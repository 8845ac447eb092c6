"""The HTTP side of `purelm serve`: OpenAI's routes (chat completions, completions, embeddings, models)
and llama.cpp's (/tokenize, /detokenize, /health, /metrics) on FastAPI, over the engine's thread.

Bodies are read and checked by `protocol` (not by FastAPI's models), so every error, malformed JSON
included, has OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..chat.tool_calls import ContentStream
from ..errors import ContextOverflowError, MemoryLimitError, PurelmError, UsageError
from ..grammar import compile_grammar, forced_call
from ..infill import check_fim, infill_ids
from ..sampling import SamplingParams, dry_breakers
from ..tokenizer import TOKEN_CONTROL
from . import anthropic as A
from . import protocol as P
from . import responses as R
from .engine import Engine, EngineStoppedError, GenerationRequest, Handle, Piece, PromptLogprobs, QueueFullError
from .metrics import Metrics

log = logging.getLogger("purelm.server")

PUBLIC = ("/health", "/v1/health")  # answered without the API key
MAX_EMBED_INPUTS = 2048


@dataclass
class ServerConfig:
    parallel: int = 8  # slots: sequences generated at once (llama-server's -np)
    batch: int = 512  # prompt tokens per step (a long prompt is prefilled in chunks of this many)
    max_queue: int = 64  # requests waiting for a slot before the server answers 503
    api_key: str | None = None
    max_body: int = 8 << 20  # bytes of a request body (413 beyond)
    model_name: str | None = None  # the id /v1/models shows (default: the file's name without .gguf)
    aliases: tuple[str, ...] = ()  # other names requests may use for the model
    prefix_cache: bool = True
    lookup: int = 0  # draft tokens per sample and step by prompt lookup (speculative decoding; 0: off)
    engine_thread: bool = True  # the app's lifespan runs the engine in a thread (serve() runs it itself)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # for the fields a request leaves out
    n_predict: int | None = None  # most tokens of a reply that gives no max_tokens (None: until the context is full)
    replica: bool = False  # one of several behind a router (Ray Serve): POST /lora-adapters would change one only
    pooling: str | None = None  # embeddings' pooling (embeddings.POOLING; None: the model file's)


class _State:
    def __init__(self, llm: Any, config: ServerConfig) -> None:
        self.llm, self.config = llm, config
        self.tokenizer = llm.tokenizer
        self.n_ctx, self.n_vocab = llm.n_ctx, llm.n_vocab
        # the longest embedding input: the context, and learned positions (BERT, GPT-2) where there are
        self.max_input = min(self.n_ctx, getattr(llm.model, "max_positions", None) or self.n_ctx)
        base = os.path.basename(llm.path)
        stem = base[:-5] if base.lower().endswith(".gguf") else base
        self.model_id = config.model_name or stem
        self.names = {self.model_id, base, stem, *config.aliases}
        self.created = int(time.time())
        self.metrics = Metrics()
        self.engine = Engine(llm, parallel=config.parallel, batch=config.batch, max_queue=config.max_queue,
                             prefix_cache=config.prefix_cache, metrics=self.metrics, lookup=config.lookup,
                             pooling=config.pooling)
        self.metrics.bind(self.engine)
        self._template: Any = None
        self._template_error: Exception | None = None

    # -- chat template (purelm.chat), built on first use
    @property
    def template(self) -> Any:
        if self._template is None and self._template_error is None:
            try:
                t = getattr(self.llm, "chat_template", None)
                if t is None:
                    from ..chat import ChatTemplate

                    t = ChatTemplate.from_gguf(self.llm.metadata, self.tokenizer)
                self._template = t
            except Exception as e:  # a broken or hostile template: chat answers with the reason
                self._template_error = e
        if self._template is None:
            raise P.APIError(500, f"the model's chat template cannot be used: {self._template_error}",
                             None, "template_error")
        return self._template

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise P.bad(f"model must be a string, got {P._kind(name)}", "model", "invalid_type")
        if name not in self.names:
            raise P.APIError(404, f"the model {name!r} does not exist: this server has {self.model_id!r}",
                             "model", "model_not_found")

    def piece(self, token: int) -> bytes:
        return self.tokenizer.token_to_piece(token) if 0 <= token < self.tokenizer.vocab_size else b""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def chat_ids(self, text: str) -> list[int]:
        """The rendered conversation's ids: special tokens parsed, BOS added as the model asks
        (and not twice when the template wrote it)."""
        tok = self.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None and tok.add_bos else None
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return tok.encode(text, add_special=True, parse_special=True)

    def check_context(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        if n_prompt >= self.n_ctx:
            raise P.bad(f"the prompt has {n_prompt} tokens but the context holds {self.n_ctx} (with room for "
                        f"at least one new token): shorten it", param, "context_length_exceeded")
        if max_tokens is not None and n_prompt + max_tokens > self.n_ctx:
            raise P.bad(f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) are more than the "
                        f"context of {self.n_ctx} tokens: lower max_tokens or shorten the prompt",
                        "max_tokens", "context_length_exceeded")
        return max_tokens if max_tokens is not None else self.n_ctx - n_prompt

    async def generation(self, body: dict, max_n: int, chat: bool, echo: bool = False,
                         n_predict: int | None = None) -> P.Generation:
        """A request's generation fields (protocol.generation, with this server's defaults). A new set of
        DRY sequence breakers is found in the vocabulary here, in a worker thread, so that the engine
        thread finds it made (a scan of the vocabulary: up to a second)."""
        if not self.llm.model.causal:
            raise P.bad(f"{self.llm.model.gguf.architecture} is an embedding model: this server answers "
                        "/v1/embeddings (and a reranker /v1/rerank), not generation", None, "model_not_generative")
        gen = P.generation(body, self.n_vocab, self.n_ctx, max_n, chat, echo, self.config.sampling,
                           n_predict)
        gen.lora = P.lora_scales(body.get("lora"), len(self.engine.adapters))
        p = gen.params
        if p.uses_dry() and p.dry_sequence_breakers:
            await asyncio.to_thread(dry_breakers, self.tokenizer, tuple(p.dry_sequence_breakers))
        return gen

    def grammar(self, fmt: tuple[str, Any] | None, stop_ids: frozenset[int] = frozenset()) -> str | None:
        """The compiled grammar of `response_format` / `json_schema` / `grammar` / a forced tool call
        (`("call", (format, tools, name, several))`), for a request whose end-of-turn tokens are
        `stop_ids` (so that the engine finds its vocabulary built); 400 if it does not compile. Runs in a
        worker thread: the first one builds llguidance's vocabulary."""
        if fmt is None:
            return None
        kind, value = fmt
        try:
            if kind == "call":
                return forced_call(self.tokenizer, *value, extra_eos=stop_ids)
            return compile_grammar(self.tokenizer, kind, value, stop_ids)
        except UsageError as e:
            code = "unsupported" if "needs llguidance" in str(e) else "invalid_value"
            raise P.bad(str(e), {"gbnf": "grammar", "call": "tools"}.get(kind, "response_format"), code) from None

    def submit(self, req: GenerationRequest) -> Handle:
        try:
            return self.engine.submit(req)
        except QueueFullError as e:
            raise P.APIError(503, str(e), None, "queue_full") from None
        except EngineStoppedError as e:
            raise P.APIError(503, str(e), None, "unavailable") from None
        except ContextOverflowError as e:
            raise P.bad(str(e), None, "context_length_exceeded") from None
        except MemoryLimitError as e:
            raise _out_of_memory(e) from None


async def read_body(request: Request, limit: int) -> dict:
    return P.json_object(await read_raw(request, limit))


async def read_raw(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    # (int() of a header of thousands of digits, or of non-ASCII digits, would raise: 500)
    if length is not None and not (length.isascii() and length.isdigit() and len(length) < 20 and int(length) <= limit):
        raise P.APIError(413, f"the body is larger than this server takes ({limit} bytes)", None, "body_too_large")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise P.APIError(413, f"the body is larger than this server takes ({limit} bytes)", None,
                                 "body_too_large")
    except ClientDisconnect:  # gone before its body ended: an answer nobody reads, not a traceback in the log
        raise P.bad("the client left before the end of its body", None, "client_disconnected") from None
    return bytes(raw)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _merged(handles: list[Handle]) -> AsyncIterator[tuple[int, list[Piece]]]:
    """(prompt index, pieces) from several handles as they come."""
    if len(handles) == 1:
        async for pieces in handles[0]:
            yield 0, pieces
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for pieces in h:
                q.put_nowait((i, pieces))
            q.put_nowait((i, done))
        except BaseException as e:  # noqa: B036 (handed to the consumer)
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, handles: list[Handle]):
    """Cancel `handles` if the client leaves while a non-streaming answer is being made."""
    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                for h in handles:
                    h.cancel()
                return

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    sent_lp: int = 0  # logprob entries already streamed
    offset: int = 0  # characters already produced (legacy text_offset)
    stop: str | None = None  # the stop string that ended it


class _Reply:
    """Accumulates the pieces of every choice of one request (prompt p, sample j: index p * n + j)."""

    def __init__(self, n_choices: int) -> None:
        self.choices = [_Choice() for _ in range(n_choices)]

    def add(self, base: int, p: Piece) -> _Choice:
        c = self.choices[base + p.index]
        c.tokens += p.sampled is not None
        if p.text:
            c.text.append(p.text)
        if p.logprob is not None and p.token is not None:
            c.logprobs.append((p.token, p.logprob, p.top or []))
        if p.finish_reason:
            c.finish_reason = p.finish_reason
            c.stop = p.stop
        return c

    def add_prompt(self, base: int, n: int, p: PromptLogprobs) -> None:
        """A prompt's logprobs, the same for each of its n choices."""
        for j in range(n):
            self.choices[base + j].logprobs.extend(p.entries)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


def create_app(llm: Any, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving `llm` (a loaded `purelm.LLM`). Its engine thread starts with the app's
    lifespan (uvicorn runs it) and stops with it."""
    config = config or ServerConfig()
    state = _State(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.engine_thread:
            state.engine.start()
        try:
            yield
        finally:
            if config.engine_thread:
                state.engine.stop()

    app = FastAPI(title="purelm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.purelm = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(P.APIError(e.status_code, msg, None, "not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(PurelmError)
    async def purelm_error(request: Request, e: PurelmError) -> JSONResponse:
        if isinstance(e, MemoryLimitError):
            err = _out_of_memory(e)
        else:
            err = P.APIError(400 if isinstance(e, (UsageError, ContextOverflowError)) else 500, str(e))
        return JSONResponse(err.body(), status_code=err.status)

    # ---------------------------------------------------------------- llama.cpp's routes
    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        e = state.engine
        if not e.running:
            return JSONResponse(P.APIError(503, "the engine is not running", None, "unavailable").body(), 503)
        return JSONResponse({"status": "ok", "slots_idle": e.parallel - e.slots_used,
                             "slots_processing": e.slots_used, "requests_waiting": e.n_waiting})

    @app.get("/props")
    async def props() -> JSONResponse:
        """llama-server's settings route, as its web UI and tools read it."""
        d = config.sampling
        try:
            t = state.template
            template, bos, eos = t.source, t.bos_token, t.eos_token
        except P.APIError:
            template, bos, eos = "", "", ""
        return JSONResponse({
            "default_generation_settings": {"n_ctx": state.n_ctx, "params": {
                "n_predict": config.n_predict or -1, "temperature": d.temperature, "top_k": d.top_k,
                "top_p": d.top_p, "min_p": d.min_p,
                "repeat_penalty": d.repeat_penalty, "repeat_last_n": d.repeat_last_n,
                "seed": -1 if d.seed is None else d.seed,
                "top_n_sigma": d.top_n_sigma, "typical_p": d.typical_p, "xtc_probability": d.xtc_probability,
                "xtc_threshold": d.xtc_threshold, "mirostat": d.mirostat, "mirostat_tau": d.mirostat_tau,
                "mirostat_eta": d.mirostat_eta, "dry_multiplier": d.dry_multiplier, "dry_base": d.dry_base,
                "dry_allowed_length": d.dry_allowed_length, "dry_penalty_last_n": d.dry_penalty_last_n,
                "dry_sequence_breakers": list(d.dry_sequence_breakers),
                # (JSON has no -inf: a banned token shows false, as llama-server's requests write it)
                "logit_bias": [[k, v if v != -math.inf else False] for k, v in (d.logit_bias or {}).items()]}},
            "total_slots": config.parallel, "model_alias": state.model_id, "model_path": state.llm.path,
            "modalities": {"vision": False, "video": False, "audio": False}, "chat_template": template,
            "bos_token": bos or "", "eos_token": eos or "", "build_info": f"purelm {__version__}",
            "endpoint_slots": False, "endpoint_props": False, "endpoint_metrics": True, "is_sleeping": False})

    @app.get("/lora-adapters")
    async def lora_adapters() -> JSONResponse:
        """llama-server's: the LoRA adapters loaded with the model (--lora), each with the scale that
        requests naming no `lora` get."""
        e = state.engine
        return JSONResponse([{"id": i, "path": a.path, "scale": scale, "task_name": "", "prompt_prefix": ""}
                             for i, (a, scale) in enumerate(zip(e.adapters, e.lora_scales))])

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: Request) -> JSONResponse:
        """llama-server's: new scales for requests naming no `lora`, [{"id", "scale"}], the adapters left
        out at 0. Requests in flight finish with the scales they started with."""
        if config.replica:
            raise P.APIError(400, "POST /lora-adapters would change one replica's scales only: give each request "
                             "its `lora`, or the replicas' defaults in the Ray config (lora: [[path, scale], ...])",
                             None, "unsupported")
        body = P.parse_json(await read_raw(request, config.max_body))
        if not isinstance(body, list):
            raise P.bad("the body must be an array of {\"id\", \"scale\"} objects", None, "invalid_type")
        e = state.engine
        e.lora_scales = P.lora_scales(body, len(e.adapters), "body") or tuple(0.0 for _ in e.adapters)
        return JSONResponse({"success": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_body(request, config.max_body)
        content = P.get_str(body, "content")
        if content is None:
            raise P.bad("content is required (a string)", "content", "missing_required_parameter")
        ids = state.tokenize(P.check_text(content, "content"), P.get_bool(body, "add_special", False),
                             P.get_bool(body, "parse_special", True))
        if P.get_bool(body, "with_pieces", False):
            out = []
            for i in ids:
                b = state.piece(i)
                try:
                    piece: Any = b.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(b)
                out.append({"id": i, "piece": piece})
            return JSONResponse({"tokens": out})
        return JSONResponse({"tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await read_body(request, config.max_body)
        ids = body.get("tokens", [])
        if ids != []:
            ids = P.token_ids(ids, state.tokenizer.vocab_size, "tokens")
        return JSONResponse({"content": state.tokenizer.decode(ids)})

    async def native(request: Request, body: dict, prompt: list[int]) -> Response:
        """llama.cpp's own completion API (`/completion`, `/infill`): its field names (`n_predict`),
        one reply, and its response: `content`, `stop`, `stop_type`, `tokens_predicted`, ...; streamed,
        an event per piece and a last one with `stop: true`, no `[DONE]`."""
        t0 = time.perf_counter()
        for name in ("n", "echo", "suffix"):  # OpenAI's, not this API's
            body.pop(name, None)
        n_predict = P.get_int(body, "n_predict", -1, 2**62)
        if n_predict == 0:
            raise P.bad("n_predict must be -1 (until the context is full) or at least 1", "n_predict")
        if n_predict is not None and n_predict > 0 and "max_tokens" not in body:
            body["max_tokens"] = min(n_predict, state.n_ctx)
        # each token's probability and its likeliest candidates' (llama.cpp: "logprobs" stands for n_probs)
        alias = P.get_int(body, "logprobs", 0, P.MAX_N_PROBS, 0)
        n_probs = P.get_int(body, "n_probs", 0, P.MAX_N_PROBS, alias)
        post = P.get_bool(body, "post_sampling_probs") and n_probs > 0
        gen = await state.generation(body, 1, chat=False, n_predict=None if n_predict == -1 else config.n_predict)
        if not prompt:
            raise P.bad("the prompt is empty (and the model adds no BOS token)", "prompt")
        # as llama-server: a reply that would pass the context's end stops there (no 400)
        max_tokens = min(state.check_context(len(prompt), None, "prompt"), gen.max_tokens or state.n_ctx)
        fmt = P.response_format(body)
        grammar = await asyncio.to_thread(state.grammar, fmt) if fmt else None
        (handle,) = _submit_all(state, [GenerationRequest(prompt, max_tokens, gen.params, 1, gen.stop, frozenset(),
                                                          gen.ignore_eos, n_probs or None, grammar,
                                                          post_sampling_probs=post, lora=gen.lora)])
        reply = _Reply(1)
        probs: list[dict] = []  # completion_probabilities, a token each (end-of-generation ones included)
        value = "prob" if post else "logprob"

        def entry(token: int, lp: float) -> dict:
            b = state.tokenizer.token_to_piece(token) if state.tokenizer.token_types[token] != TOKEN_CONTROL else b""
            return {"id": token, "token": _utf8_prefix(b), "bytes": list(b), value: math.exp(lp) if post else lp}

        def add(p: Piece) -> None:
            if p.sampled is not None and p.logprob is not None:
                probs.append({**entry(p.sampled, p.logprob),
                              "top_probs" if post else "top_logprobs": [entry(t, v) for t, v in p.top or []]})

        def final() -> dict:
            c = reply.choices[0]
            kind = {"length": "limit", "stop": "word" if c.stop else "eos"}.get(c.finish_reason or "", "none")
            elapsed = time.perf_counter() - t0
            out = {"index": 0, "content": "" if gen.stream else "".join(c.text), "tokens": [], "id_slot": -1,
                   "stop": True, "model": state.model_id, "tokens_predicted": c.tokens,
                   "tokens_evaluated": len(prompt), "truncated": False, "stop_type": kind,
                   "stopping_word": c.stop or "", "has_new_line": "\n" in "".join(c.text),
                   "timings": {"prompt_n": len(prompt), "predicted_n": c.tokens,
                               "predicted_per_second": c.tokens / elapsed if elapsed > 0 else 0.0}}
            if n_probs and not gen.stream:  # without the stop string's tokens, as llama-server
                cut = min(len(probs), len(state.tokenize(c.stop, False, False))) if c.stop else 0
                out["completion_probabilities"] = probs[:len(probs) - cut]
            return out

        if gen.stream:
            async def events() -> AsyncIterator[bytes]:
                async for _, pieces in _merged([handle]):
                    for p in pieces:
                        c = reply.add(0, p)
                        add(p)
                        if p.text or probs:  # with n_probs, an event for every token
                            event = {"index": 0, "content": p.text, "tokens": [] if p.token is None else [p.token],
                                     "stop": False, "id_slot": -1, "tokens_predicted": c.tokens,
                                     "tokens_evaluated": len(prompt)}
                            if probs:
                                event["completion_probabilities"] = probs[:]
                                probs.clear()
                            yield sse(event)
                yield sse(final())

            return _stream(_ended(events(), [handle], state, t0, done=False))
        await _collect(request, [handle], reply, 1, state, t0, add)
        return JSONResponse(final())

    @app.post("/completion")
    async def completion(request: Request) -> Response:
        body = await read_body(request, config.max_body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = state.tokenize(P.check_text(prompt, "prompt"))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):
            ids = P.token_ids(prompt, state.n_vocab, "prompt")
        else:
            raise P.bad("prompt must be a string or an array of token ids", "prompt", "invalid_type")
        return await native(request, body, ids)

    @app.post("/infill")
    async def infill(request: Request) -> Response:
        """llama.cpp's fill-in-the-middle route (its editor plug-ins: llama.vim, llama.vscode)."""
        body = await read_body(request, config.max_body)
        try:
            check_fim(state.tokenizer)
        except UsageError as e:
            raise P.APIError(501, f"infill is not supported by this model: {e}", None, "not_supported") from None
        texts = {}
        for name in ("input_prefix", "input_suffix", "prompt"):
            v = body.get(name, "" if name == "prompt" else None)
            if not isinstance(v, str):
                raise P.bad(f"{name} must be a string" + ("" if name == "prompt" else " (required)"), name,
                            "invalid_type" if v is not None else "missing_required_parameter")
            texts[name] = P.check_text(v, name)
        extra = body.get("input_extra", [])
        if not isinstance(extra, list) or len(extra) > P.MAX_PROMPTS or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("filename", ""), str)
                for c in extra):
            raise P.bad(f"input_extra must be an array of at most {P.MAX_PROMPTS} {{\"filename\": string, "
                        "\"text\": string}", "input_extra", "invalid_type")
        chunks = [(P.check_text(c.get("filename", "tmp"), "input_extra"), P.check_text(c["text"], "input_extra"))
                  for c in extra]
        ids = infill_ids(state.tokenizer, texts["input_prefix"], texts["input_suffix"], texts["prompt"], chunks,
                         n_ctx=state.n_ctx)
        if len(ids) >= state.n_ctx:  # llama.cpp's budgets left no room for a reply here: no extra files then
            ids = infill_ids(state.tokenizer, texts["input_prefix"], texts["input_suffix"], texts["prompt"], chunks,
                             n_ctx=state.n_ctx, n_predict=state.n_ctx)
        return await native(request, body, ids)

    # ---------------------------------------------------------------- OpenAI's routes
    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> JSONResponse:
        m = state.llm.model
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": state.created, "owned_by": "purelm",
            "meta": {"n_ctx": state.n_ctx, "n_ctx_train": m.n_ctx_train, "n_vocab": state.n_vocab,
                     "n_embd": getattr(m, "dim", None), "size": os.path.getsize(state.llm.path),
                     "path": os.path.basename(state.llm.path), "aliases": sorted(state.names)}}]})

    async def encoded(request: Request, ids: list[list[int]], rank: bool) -> dict[int, np.ndarray]:
        """Each input's embedding (or, `rank`, a reranker's scores) by index, from the engine."""
        try:
            handle = state.engine.submit_embeddings(ids, rank=rank)
        except QueueFullError as e:
            raise P.APIError(503, str(e), None, "queue_full") from None
        out: dict[int, np.ndarray] = {}
        async with _watch_disconnect(request, [handle]):
            async for items in handle:
                out.update(items)
        return out

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await read_body(request, config.max_body)
        state.check_model(body)
        inp = body.get("input")
        if isinstance(inp, str):
            inputs: list = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(t, int) and not isinstance(t, bool) for t in inp):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = inp
        else:
            raise P.bad("input must be a string, an array of strings or of token-id arrays (not empty)", "input",
                        "invalid_type")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise P.bad(f"input has {len(inputs)} items; at most {MAX_EMBED_INPUTS}", "input")
        fmt = P.get_str(body, "encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise P.bad(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
        dims = P.get_int(body, "dimensions", 1, 2**31)
        if dims is not None and dims != getattr(state.llm.model, "dim", dims):
            raise P.bad(f"dimensions: this model's embeddings have {state.llm.model.dim}", "dimensions", "unsupported")
        ids = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                t = state.tokenize(P.check_text(x, f"input[{i}]"))
            else:
                t = P.token_ids(x, state.n_vocab, f"input[{i}]")
            if not t:
                raise P.bad(f"input[{i}] is empty", "input")
            if len(t) > state.max_input:
                raise P.bad(f"input[{i}] has {len(t)} tokens; the model takes at most {state.max_input} (its "
                            "context, and any learned positions)", "input", "context_length_exceeded")
            ids.append(t)
        vectors = await encoded(request, ids, rank=False)
        data = []
        for i in range(len(ids)):
            v = vectors[i]
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(map(len, ids))
        return JSONResponse({"object": "list", "data": data, "model": state.model_id,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.post("/v1/rerank")
    @app.post("/rerank")
    @app.post("/v1/reranking")
    @app.post("/reranking")
    async def rerank(request: Request) -> JSONResponse:
        """llama-server's reranking: Jina's body ({"query", "documents", "top_n", "return_documents"};
        results [{"index", "relevance_score"}] most relevant first) or TEI's ({"query", "texts",
        "return_text"}; a bare list of {"index", "score"})."""
        body = await read_body(request, config.max_body)
        state.check_model(body)
        if not getattr(state.llm.model, "n_cls_out", 0):
            raise P.bad("this model cannot rerank: it has no classification head (a reranker is a cross-encoder, "
                        "such as a converted RobertaForSequenceClassification)", None, "not_supported")
        query = body.get("query")
        if not isinstance(query, str):
            raise P.bad("query must be a string", "query", "invalid_type")
        tei = "texts" in body
        docs = body.get("texts" if tei else "documents")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            raise P.bad(f"{'texts' if tei else 'documents'} must be a non-empty array of strings",
                        "texts" if tei else "documents", "invalid_type")
        if len(docs) > MAX_EMBED_INPUTS:
            raise P.bad(f"{len(docs)} documents; at most {MAX_EMBED_INPUTS}", "texts" if tei else "documents")
        field = "texts" if tei else "documents"
        top_n = P.get_int(body, "top_n", 0, 2**31, len(docs))
        with_text = P.get_bool(body, "return_text" if tei else "return_documents")
        query = P.check_text(query, "query")
        docs = [P.check_text(d, f"{field}[{i}]") for i, d in enumerate(docs)]
        ids = await asyncio.to_thread(state.tokenizer.encode_pairs, query, docs)  # (off the event loop)
        for i, t in enumerate(ids):
            if len(t) > state.max_input:
                raise P.bad(f"{field}[{i}] and the query have {len(t)} tokens; the model takes at most "
                            f"{state.max_input}", field, "context_length_exceeded")
        scores = await encoded(request, ids, rank=True)
        label = "score" if tei else "relevance_score"
        results = sorted(({"index": i, label: float(scores[i][0])} for i in range(len(docs))),
                         key=lambda r: -r[label])[:top_n]
        for r in results if with_text else ():
            if tei:
                r["text"] = docs[r["index"]]
            else:
                r["document"] = {"text": docs[r["index"]]}
        if tei:
            return JSONResponse(results)
        n = sum(map(len, ids))
        return JSONResponse({"model": state.model_id, "object": "list", "results": results,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await read_body(request, config.max_body)
        state.check_model(body)
        prompts = P.prompts(body, state.n_vocab)
        echo = P.get_bool(body, "echo")
        gen = await state.generation(body, config.parallel, chat=False, echo=echo, n_predict=config.n_predict)
        k = P.get_int(body, "logprobs", 0, P.MAX_TOP_LOGPROBS)
        suffix = P.get_str(body, "suffix")
        fmt = P.response_format(body)
        grammar = await asyncio.to_thread(state.grammar, fmt) if fmt else None
        if suffix:  # fill in the middle: the prompt before the gap, the suffix after it (as /infill)
            if echo or not all(isinstance(p, str) for p in prompts):
                raise P.bad("suffix takes text prompts, without echo", "suffix")
            try:
                check_fim(state.tokenizer)
            except UsageError as e:
                raise P.bad(str(e), "suffix", "unsupported") from None
            suffix = P.check_text(suffix, "suffix")
            ids = [infill_ids(state.tokenizer, p, suffix, n_ctx=state.n_ctx) for p in prompts]
        else:
            ids = [state.tokenize(p) if isinstance(p, str) else p for p in prompts]
        reqs = []
        for p in ids:
            if not p:
                raise P.bad("a prompt is empty (and the model adds no BOS token)", "prompt")
            max_tokens = state.check_context(len(p), gen.max_tokens, "prompt")
            reqs.append(GenerationRequest(p, max_tokens, gen.params, gen.n, gen.stop, frozenset(), gen.ignore_eos,
                                          k, grammar, prompt_logprobs=k if echo else None, lora=gen.lora))
        # echo: each choice's text starts with its prompt, as its tokens spell it (special tokens as no
        # text), and with logprobs its prompt tokens' logprobs come first (the first token's None), as
        # OpenAI's legacy API does; text_offset counts in that text
        echoed, echo_offsets = zip(*(_spelled(state.tokenizer, t) if echo else ("", []) for t in ids))
        handles = _submit_all(state, reqs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        reply = _Reply(len(reqs) * gen.n)
        prompt_tokens = sum(map(len, ids))

        def legacy_logprobs(c: _Choice, start: int, stop: int | None = None, offsets: list[int] | None = None) -> dict:
            toks, lps, tops, offs = [], [], [], []
            off = c.offset
            for i, (tok, lp, top) in enumerate(c.logprobs[start:stop]):
                s = state.piece(tok).decode("utf-8", "replace")
                toks.append(s)
                lps.append(lp)
                tops.append({state.piece(t).decode("utf-8", "replace"): v for t, v in top} if lp is not None else None)
                offs.append(off if offsets is None else offsets[i])
                off += len(s)
            c.offset = off
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        def echo_event(p_index: int) -> list[dict]:
            """The prompt's text (and with logprobs, its tokens' ones) for each of its choices."""
            out = []
            for j in range(gen.n):
                c = reply.choices[p_index * gen.n + j]
                lp = legacy_logprobs(c, 0, offsets=echo_offsets[p_index]) if k is not None else None
                c.sent_lp, c.offset = len(c.logprobs), len(echoed[p_index])  # (offsets: in the text sent)
                out.append({"text": echoed[p_index], "index": p_index * gen.n + j, "logprobs": lp,
                            "finish_reason": None})
            return out

        def usage() -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": prompt_tokens + reply.completion_tokens}

        if gen.stream:
            async def events() -> AsyncIterator[bytes]:
                if echo and k is None:
                    for p_index in range(len(reqs)):
                        yield sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": state.model_id, "choices": echo_event(p_index)})
                async for p_index, pieces in _merged(handles):
                    for p in pieces:
                        if isinstance(p, PromptLogprobs):
                            reply.add_prompt(p_index * gen.n, gen.n, p)
                            if len(reply.choices[p_index * gen.n].logprobs) == len(reqs[p_index].prompt):
                                yield sse({"id": rid, "object": "text_completion", "created": created,
                                           "model": state.model_id, "choices": echo_event(p_index)})
                            continue
                        index = p_index * gen.n + p.index
                        c = reply.add(p_index * gen.n, p)
                        if not p.text and not p.finish_reason:
                            continue
                        lp = legacy_logprobs(c, c.sent_lp) if k is not None else None
                        c.sent_lp = len(c.logprobs)
                        yield sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": state.model_id, "choices": [
                                       {"text": p.text, "index": index, "logprobs": lp,
                                        "finish_reason": p.finish_reason}]})
                if gen.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                               "choices": [], "usage": usage()})

            return _stream(_ended(events(), handles, state, t0))

        await _collect(request, handles, reply, gen.n, state, t0)

        def choice(i: int, c: _Choice) -> dict:
            lp = None
            if k is not None:
                n_prompt = len(reqs[i // gen.n].prompt) if echo else 0
                lp = legacy_logprobs(c, 0, n_prompt, echo_offsets[i // gen.n])
                c.offset = len(echoed[i // gen.n])
                for key, values in legacy_logprobs(c, n_prompt).items():
                    lp[key] += values
            return {"text": echoed[i // gen.n] + "".join(c.text), "index": i, "logprobs": lp,
                    "finish_reason": c.finish_reason}

        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": state.model_id,
            "choices": [choice(i, c) for i, c in enumerate(reply.choices)], "usage": usage()})

    def render(body: dict, msgs: list[dict], tools: list[dict] | None) -> str:
        """The chat template's prompt for these messages and tools (`chat_template_kwargs` passed on)."""
        extra = P.get_dict(body, "chat_template_kwargs") or {}
        try:
            return state.template.render(msgs, add_generation_prompt=True, tools=tools, **extra)
        except UsageError as e:  # a message the template layer refuses
            raise P.bad(str(e), "messages") from None
        except Exception as e:  # purelm.errors.TemplateError: the template raised, or its sandbox refused
            raise P.bad(f"the chat template failed on these messages: {e}", "messages", "template_error") from None

    @app.post("/apply-template")
    async def apply_template(request: Request) -> JSONResponse:
        """llama-server's route: the prompt a chat request would run, rendered and not run."""
        body = await read_body(request, config.max_body)
        tools, tool_choice = P.tools(body)
        use_tools = tools if tools and tool_choice != "none" else None
        prompt = render(body, P.messages(body), use_tools)
        # a lone surrogate of chat_template_kwargs that the template echoes cannot be written as UTF-8
        return JSONResponse({"prompt": prompt.encode("utf-8", "replace").decode("utf-8")})

    def forced(template: Any, tools: list[dict] | None, tool_choice: Any, fmt: Any, parallel: bool) -> tuple[str, Any]:
        """tool_choice "required" or a named function as a grammar to compile: the reply is a call (with
        "required" and `parallel`, one or more), in the format the template shows the model (llama-server
        and vLLM force it likewise)."""
        if not tools:
            raise P.bad("tool_choice asks for a tool call, but the request has no tools", "tool_choice")
        if fmt:
            raise P.bad("a tool_choice that forces a call cannot be combined with response_format, json_schema "
                        "or grammar", "tool_choice")
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise P.bad(f"tool_choice names {name!r:.80}, which is not among the tools", "tool_choice")
        return "call", (getattr(template, "call_format", "hermes"), tools, name, name is None and parallel)

    async def chat_turn(body: dict) -> _ChatTurn:
        """A chat request's checked fields, rendered prompt and engine request (the chat route's, and
        the Responses API's once its body is put in chat's terms)."""
        state.check_model(body)
        msgs = P.messages(body)
        tools, tool_choice = P.tools(body)
        gen = await state.generation(body, config.parallel, chat=True, n_predict=config.n_predict)
        want_lp = P.get_bool(body, "logprobs")
        top_k = P.get_int(body, "top_logprobs", 0, P.MAX_TOP_LOGPROBS)
        if top_k is not None and not want_lp:
            raise P.bad("top_logprobs needs logprobs: true", "top_logprobs")
        k = (top_k or 0) if want_lp else None
        template = state.template
        stop_ids = frozenset() if gen.ignore_eos else frozenset(getattr(template, "stop_token_ids", ()) or ())
        fmt = P.response_format(body)
        parallel = P.get_bool(body, "parallel_tool_calls", True)
        if tool_choice == "required" or isinstance(tool_choice, dict):  # the reply is a call: a grammar says so
            fmt = forced(template, tools, tool_choice, fmt, parallel)
        grammar = await asyncio.to_thread(state.grammar, fmt, stop_ids) if fmt else None
        use_tools = tools if tools and tool_choice != "none" else None
        text = render(body, msgs, use_tools)
        ids = template.encode(text) if hasattr(template, "encode") else state.chat_ids(text)
        max_tokens = state.check_context(len(ids), gen.max_tokens, "messages")
        stops = list(gen.stop) + [s for s in (getattr(template, "stop_strings", ()) or ()) if s not in gen.stop]
        req = GenerationRequest(ids, max_tokens, gen.params, gen.n, stops, stop_ids, gen.ignore_eos, k, grammar,
                                lora=gen.lora)
        return _ChatTurn(gen, k, ids, req, template, use_tools, parallel)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await read_body(request, config.max_body)
        turn = await chat_turn(body)
        gen, k, ids, use_tools, template = turn.gen, turn.k, turn.ids, turn.use_tools, turn.template
        handles = _submit_all(state, [turn.req])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        reply = _Reply(gen.n)

        def lp_entries(c: _Choice, start: int) -> list[dict]:
            out = []
            for tok, lp, top in c.logprobs[start:]:
                b = state.piece(tok)
                out.append({"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b),
                            "top_logprobs": [{"token": state.piece(t).decode("utf-8", "replace"), "logprob": v,
                                              "bytes": list(state.piece(t))} for t, v in top]})
            return out

        def finish(c: _Choice) -> tuple[str | None, list[dict] | None, str | None]:
            """content, tool calls and finish reason of a finished choice."""
            content, calls = turn.tool_calls("".join(c.text))
            return (content, calls, "tool_calls") if calls else (content, None, c.finish_reason)

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": reply.completion_tokens,
                    "total_tokens": len(ids) + reply.completion_tokens}

        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: Any = None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]})

        if gen.stream:
            async def events() -> AsyncIterator[bytes]:
                for j in range(gen.n):
                    yield chunk(j, {"role": "assistant", "content": ""})
                shown = [ContentStream() for _ in range(gen.n)] if use_tools else None
                async for _, pieces in _merged(handles):
                    for p in pieces:
                        c = reply.add(0, p)
                        if shown is not None:  # text before a tool call as it comes; the calls once whole
                            text = shown[p.index].add(p.text) if p.text else ""
                            delta: dict = {}
                            reason = None
                            if p.finish_reason:
                                content, calls, reason = finish(c)
                                text += shown[p.index].rest(content)
                                if calls:
                                    delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
                            if text:
                                delta = {"content": text, **delta}
                            if delta or reason:
                                lp = {"content": lp_entries(c, c.sent_lp)} if k is not None else None
                                c.sent_lp = len(c.logprobs)
                                yield chunk(p.index, delta, reason, lp)
                            continue
                        if not p.text and not p.finish_reason:
                            continue
                        lp = {"content": lp_entries(c, c.sent_lp)} if k is not None else None
                        c.sent_lp = len(c.logprobs)
                        yield chunk(p.index, {"content": p.text} if p.text else {}, p.finish_reason, lp)
                if gen.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                               "choices": [], "usage": usage()})

            return _stream(_ended(events(), handles, state, t0))

        await _collect(request, handles, reply, gen.n, state, t0)
        choices = []
        for i, c in enumerate(reply.choices):
            content, calls, reason = finish(c)
            message: dict = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": lp_entries(c, 0)} if k is not None else None,
                            "finish_reason": reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
                             "choices": choices, "usage": usage()})

    @app.post("/v1/responses")
    @app.post("/responses")
    async def responses(request: Request) -> Response:
        """OpenAI's Responses API, over the chat route (purelm.server.responses)."""
        t0 = time.perf_counter()
        body = await read_body(request, config.max_body)
        turn = await chat_turn(R.to_chat(body))
        (handle,) = _submit_all(state, [turn.req])
        b = R.Builder(body, state.model_id)
        reply = _Reply(1)

        def done() -> tuple[str, list[dict], dict, str | None]:
            """status, output items, usage and the reason it is incomplete (None: it is not)."""
            c = reply.choices[0]
            content, calls = turn.tool_calls("".join(c.text))
            incomplete = "max_output_tokens" if c.finish_reason == "length" and not calls else None
            status = "incomplete" if incomplete else "completed"
            return status, b.output(content, calls, status), b.usage(len(turn.ids), c.tokens), incomplete

        if turn.gen.stream:
            def text_start(index: int) -> list[bytes]:
                return [b.event("response.output_item.added", output_index=index,
                                item={**b.message("", "in_progress"), "content": []}),
                        b.event("response.content_part.added", item_id=b.message_id, output_index=index,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                       "logprobs": []})]

            async def events() -> AsyncIterator[bytes]:
                yield b.event("response.created", response=b.response("in_progress", []))
                yield b.event("response.in_progress", response=b.response("in_progress", []))
                streaming = False  # text deltas sent (with tools: the text before a call, as ContentStream shows it)
                shown = ContentStream() if turn.use_tools else None
                try:
                    async for text in _texts(handle, reply, shown):
                        if not streaming:
                            streaming = True
                            for e in text_start(0):
                                yield e
                        yield b.event("response.output_text.delta", item_id=b.message_id, output_index=0,
                                      content_index=0, delta=text, logprobs=[])
                except PurelmError as e:
                    yield b.event("error", code=_failed(e).code, message=str(e), param=None)
                    return
                status, output, usage, incomplete = done()
                for i, item in enumerate(output):
                    if item["type"] == "message":
                        part = item["content"][0]
                        rest = part["text"] if not streaming else shown.rest(part["text"]) if shown else ""
                        if not streaming:
                            for e in text_start(i):
                                yield e
                        if rest:
                            yield b.event("response.output_text.delta", item_id=item["id"], output_index=i,
                                          content_index=0, delta=rest, logprobs=[])
                        yield b.event("response.output_text.done", item_id=item["id"], output_index=i,
                                      content_index=0, text=part["text"], logprobs=[])
                        yield b.event("response.content_part.done", item_id=item["id"], output_index=i,
                                      content_index=0, part=part)
                    else:
                        yield b.event("response.output_item.added", output_index=i,
                                      item={**item, "arguments": "", "status": "in_progress"})
                        yield b.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                      delta=item["arguments"])
                        yield b.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                      name=item["name"], arguments=item["arguments"])
                    yield b.event("response.output_item.done", output_index=i, item=item)
                yield b.event("response.incomplete" if incomplete else "response.completed",
                              response=b.response(status, output, usage, incomplete))

            return _stream(_ended(events(), [handle], state, t0, done=False))

        await _collect(request, [handle], reply, 1, state, t0)
        status, output, usage, incomplete = done()
        return JSONResponse(b.response(status, output, usage, incomplete))

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        """Anthropic's Messages API, over the chat route (purelm.server.anthropic)."""
        t0 = time.perf_counter()
        body = await read_body(request, config.max_body)
        turn = await chat_turn(A.to_chat(body))
        (handle,) = _submit_all(state, [turn.req])
        mid = f"msg_{uuid.uuid4().hex}"
        reply = _Reply(1)

        def done() -> tuple[list[dict], str, str | None]:
            """content blocks, stop reason and stop sequence of the finished reply."""
            c = reply.choices[0]
            content, calls = turn.tool_calls("".join(c.text))
            return A.content_blocks(content, calls), A.stop_reason(c.finish_reason, c.stop, calls), \
                None if calls else c.stop

        if turn.gen.stream:
            async def events() -> AsyncIterator[bytes]:
                yield A.event("message_start", message=A.message(state.model_id, [], None, None, len(turn.ids), 0, mid))
                streaming = False  # a text block open (with tools: the text before a call, as ContentStream shows it)
                shown = ContentStream() if turn.use_tools else None
                try:
                    async for text in _texts(handle, reply, shown):
                        if not streaming:
                            streaming = True
                            yield A.event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                        yield A.event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
                except PurelmError as e:
                    err = _failed(e)
                    yield A.event("error", error={"type": "overloaded_error" if err.status == 503 else "api_error",
                                                  "message": str(e)})
                    return
                blocks, reason, stop = done()
                if streaming:  # the text block, sent already but for what `shown` held back
                    rest = shown.rest(blocks[0]["text"]) if shown and blocks and blocks[0]["type"] == "text" else ""
                    if rest:
                        yield A.event("content_block_delta", index=0, delta={"type": "text_delta", "text": rest})
                    yield A.event("content_block_stop", index=0)
                    blocks = blocks[1:]
                for index, block in enumerate(blocks, start=int(streaming)):
                    if block["type"] == "text":
                        yield A.event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                        yield A.event("content_block_delta", index=index,
                                      delta={"type": "text_delta", "text": block["text"]})
                    else:
                        yield A.event("content_block_start", index=index, content_block={**block, "input": {}})
                        yield A.event("content_block_delta", index=index, delta={
                            "type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                    yield A.event("content_block_stop", index=index)
                yield A.event("message_delta", delta={"stop_reason": reason, "stop_sequence": stop},
                              usage={"output_tokens": reply.choices[0].tokens})
                yield A.event("message_stop")

            return _stream(_ended(events(), [handle], state, t0, done=False))

        await _collect(request, [handle], reply, 1, state, t0)
        blocks, reason, stop = done()
        return JSONResponse(A.message(state.model_id, blocks, reason, stop, len(turn.ids), reply.choices[0].tokens,
                                      mid))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> JSONResponse:
        """The prompt's length as /v1/messages would render it."""
        body = await read_body(request, config.max_body)
        chat = A.to_chat(body, count_only=True)
        chat.pop("stream", None)
        return JSONResponse({"input_tokens": len((await chat_turn(chat)).ids)})

    return app


@dataclass
class _ChatTurn:
    """What create_app's chat_turn makes of a chat request."""

    gen: P.Generation
    k: int | None  # top logprobs (None: no logprobs)
    ids: list[int]
    req: GenerationRequest
    template: Any
    use_tools: list[dict] | None
    parallel: bool = True  # parallel_tool_calls: false keeps a reply's first call only

    def tool_calls(self, text: str) -> tuple[str | None, list[dict] | None]:
        """A finished reply's content and tool calls (chat's format), parsed in the template family's
        format when the request has tools; an unparsable call stays content. With tools, content has
        no leading spaces, as ContentStream streams it (a reply with calls has them stripped anyway)."""
        if self.use_tools and hasattr(self.template, "parse_tool_calls"):
            try:
                content, calls = self.template.parse_tool_calls(text, self.use_tools)
            except Exception:
                log.exception("parsing tool calls failed")
                calls = None
            if calls:
                return content or None, calls if self.parallel else calls[:1]
        return (text.lstrip() if self.use_tools else text), None


def _utf8_prefix(b: bytes) -> str:
    """The text of a token's bytes up to a UTF-8 character they end inside (llama.cpp's
    validate_utf8): a byte token of a longer character gives ""."""
    for end in range(len(b), max(len(b) - 4, -1), -1):
        try:
            return b[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return b.decode("utf-8", "replace")


async def _collect(request: Request, handles: list[Handle], reply: _Reply, n: int, state: _State, t0: float,
                   each: Callable[[Piece], None] | None = None) -> None:
    """Whole replies into `reply` (prompt i's n choices from index i * n on), each piece also to
    `each`; a failed one raises its 503 or 500, a client that leaves cancels them all."""
    try:
        async with _watch_disconnect(request, handles):
            async for p_index, pieces in _merged(handles):
                for p in pieces:
                    if isinstance(p, PromptLogprobs):
                        reply.add_prompt(p_index * n, n, p)
                    else:
                        reply.add(p_index * n, p)
                        if each is not None:
                            each(p)
    except PurelmError as e:
        raise _failed(e) from None
    finally:
        for h in handles:
            h.cancel()
    state.metrics.duration.observe(time.perf_counter() - t0)


async def _texts(handle: Handle, reply: _Reply, shown: ContentStream | None) -> AsyncIterator[str]:
    """One reply's pieces into `reply`, their text yielded as it comes (a reply with tools: what
    `shown` lets through of it, the rest is parsed once the reply is whole)."""
    async for _, pieces in _merged([handle]):
        for p in pieces:
            reply.add(0, p)
            text = shown.add(p.text) if shown is not None and p.text else p.text
            if text:
                yield text


def _submit_all(state: _State, reqs: list[GenerationRequest]) -> list[Handle]:
    handles: list[Handle] = []
    try:
        for r in reqs:
            handles.append(state.submit(r))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


def _spelled(tokenizer: Any, ids: list[int]) -> tuple[str, list[int]]:
    """The text `ids` spell (special tokens as none) and where each token starts in it."""
    dec = tokenizer.stream_decoder(skip_special=True)
    parts = [dec.feed(t) for t in ids]
    parts[-1] += dec.flush()
    return "".join(parts), list(itertools.accumulate((len(x) for x in parts[:-1]), initial=0))


def _out_of_memory(e: MemoryLimitError) -> P.APIError:
    return P.APIError(503, str(e), None, "insufficient_memory")


def _failed(e: Exception) -> P.APIError:
    """The error a client gets for a request that failed in the engine: 503 when the memory ran
    out (a retry later may fit), else 500."""
    return _out_of_memory(e) if isinstance(e, MemoryLimitError) else P.APIError(500, str(e), None, "generation_failed")


def _error_body(e: Exception) -> dict:
    return (e if isinstance(e, P.APIError) else _failed(e)).body()


async def _ended(events: AsyncIterator[bytes], handles: list, state: Any, t0: float,
                 done: bool = True) -> AsyncIterator[bytes]:
    """A streamed reply's events, then `[DONE]` (OpenAI's routes); an error ends the stream with an
    error event. Its requests are cancelled when it ends, also when the client left."""
    try:
        async for event in events:
            yield event
        if done:
            yield b"data: [DONE]\n\n"
    except (PurelmError, P.APIError) as e:
        yield sse(_error_body(e))
    except Exception as e:  # a bug: the client gets an error event rather than a dropped connection
        log.exception("a streamed reply failed")
        yield sse(P.APIError(500, f"the reply failed: {e}", None, "generation_failed").body())
    finally:
        for h in handles:
            h.cancel()
        state.metrics.duration.observe(time.perf_counter() - t0)


def _stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Gate:
    """ASGI middleware: the API key (401 without it, when the server has one) and the request counter
    of /metrics (by route and status)."""

    def __init__(self, app: Any, state: _State) -> None:
        self.app, self.state = app, state
        self.routes = {"/health", "/v1/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/models",
                       "/v1/embeddings", "/embeddings", "/v1/completions", "/completions", "/v1/chat/completions",
                       "/chat/completions", "/completion", "/infill", "/v1/responses", "/responses",
                       "/v1/messages", "/v1/messages/count_tokens", "/props", "/apply-template", "/v1/rerank",
                       "/rerank", "/v1/reranking", "/reranking"}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = [0]

        async def send_(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            key = self.state.config.api_key
            if key and path not in PUBLIC and not self._authorized(scope, key):
                resp = JSONResponse(P.APIError(401, "a valid API key is required: Authorization: Bearer KEY",
                                               None, "invalid_api_key").body(), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_)
            await self.app(scope, receive, send_)
        finally:
            self.state.metrics.requests.labels(route, str(status[0])).inc()

    @staticmethod
    def _authorized(scope: dict, key: str) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                v = value.decode("latin-1")
                if v[:7].lower() == "bearer " and hmac.compare_digest(v[7:].strip().encode(), key.encode()):
                    return True
            if name == b"x-api-key" and hmac.compare_digest(value.strip(), key.encode()):
                return True
        return False
