"""The Ray Serve application: purelm's own OpenAI server app in every model replica, and a small
ingress in front that reads each request's body so that the prefix router can see its prompt.

    client ──HTTP──> Serve proxy ──> PurelmIngress ──handle (PrefixRouter)──> PurelmServer replica 1..N
                                     (reads the body)                        (purelm's FastAPI app,
                                                                              engine, KV cache)

`PurelmServer` wraps `purelm.server.create_app` with `serve.ingress` (the app is built in the replica
after the model is loaded, once per replica), so the same routes, errors and continuous batching as
`purelm serve` run in each replica. Without prefix routing it is the application's ingress itself and
Serve's proxy routes to it directly (power of two choices). With prefix routing (the default) the
ingress forwards each request with its body through a deployment handle to `PurelmServer.forward`,
which runs the request through the same app in-process and streams its ASGI messages back."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.responses import Response

from ...errors import PurelmError
from .config import RayServeConfig
from .router import PrefixRouter

log = logging.getLogger("purelm.ray")

REPLICA_HEADER = b"x-purelm-replica"  # which replica answered (its Serve replica id)
STATS_PERIOD_S = 2.0  # how often Serve asks each replica for its routing stats


def load_model(config: RayServeConfig) -> Any:
    """The replica's model, with the config's chat template; its logit bias checked against the vocabulary."""
    from ...api import load
    from ...chat import use_template_choice

    llm = load(config.model, **config.load_kwargs())
    config.sampling_params().check_bias_ids(llm.n_vocab, "sampling.logit_bias")
    use_template_choice(llm, config.template_choice())
    return llm


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a test calling the class directly)
        return "local"


class _ReplicaHeader:
    """ASGI middleware: names the replica in every response's headers."""

    def __init__(self, app: Any, replica: str) -> None:
        self.purelm_app, self.header = app, (REPLICA_HEADER, replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.purelm_app(scope, receive, send)

        async def send_(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = dict(msg, headers=[*msg.get("headers", []), self.header])
            await send(msg)

        await self.purelm_app(scope, receive, send_)


@serve.deployment(name="PurelmServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class PurelmServer:
    """One replica: the model (loaded once), purelm's server app and its engine thread."""

    def __init__(self, config: dict) -> None:
        self.config = RayServeConfig.from_dict(config)
        self.llm = load_model(self.config)
        self.replica = _replica_id()
        self.purelm_app: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from ...server import create_app

        self.purelm_app = create_app(self.llm, self.config.server_config())
        self.purelm_app.add_middleware(_ReplicaHeader, replica=self.replica)
        return self.purelm_app

    @property
    def engine(self) -> Any:
        return self.purelm_app.state.purelm.engine

    async def forward(self, request: dict) -> AsyncIterator[dict]:
        """Run one HTTP request forwarded by the ingress ({"method", "path", "root_path", "query_string",
        "headers", "body"}) through the app; yields its ASGI messages. The caller cancelling the stream
        (its client left) reads to the app as a disconnect."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request["method"], "scheme": "http", "path": request["path"],
                 "raw_path": request["path"].encode(), "root_path": request.get("root_path", ""),
                 "query_string": request.get("query_string", b""), "headers": request.get("headers", []),
                 "server": None, "client": None, "state": {}}
        body = request.get("body", b"")
        body_sent = False
        gone = asyncio.Event()
        sent: asyncio.Queue = asyncio.Queue()

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            await sent.put(msg)

        done = object()

        async def run() -> None:
            try:
                await self.purelm_app(scope, receive, send)
            finally:
                await sent.put(done)

        task = asyncio.ensure_future(run())
        try:
            while True:
                msg = await sent.get()
                if msg is done:
                    break
                yield msg
            await task  # re-raise what the app raised
        finally:
            gone.set()
            if not task.done():
                task.cancel()

    def stats(self) -> dict:
        """This replica's engine counters (Serve also collects them through record_routing_stats)."""
        e = self.engine
        return {"replica": self.replica, "prefix_hits": e.prefix_hits,
                "prompt_tokens_reused": e.prompt_tokens_reused, "prompt_tokens_evaluated": e.prompt_tokens_evaluated,
                "tokens_generated": e.tokens_generated, "slots_used": e.slots_used, "waiting": e.n_waiting}

    def record_routing_stats(self) -> dict:
        """Serve's per-replica state hook: called every STATS_PERIOD_S by the controller, which hands
        the dict to every router (RunningReplica.routing_stats)."""
        return self.stats()

    def check_health(self) -> None:
        if self.purelm_app is not None and not self.engine.running:
            raise PurelmError(f"replica {self.replica}: the engine thread is not running")


@serve.deployment(name="PurelmIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class PurelmIngress:
    """Reads each request's body (at most `max_body` bytes) and hands it, with the method, path and
    headers, to a PurelmServer replica chosen by the PrefixRouter; the reply is relayed as it streams
    (see _Relay). A plain deployment, not a second `serve.ingress` (Serve allows one per application)."""

    def __init__(self, server: Any, max_body: int = 8 << 20) -> None:
        self.server = server.options(method_name="forward", stream=True)
        self.max_body = max_body

    async def __call__(self, request: Any) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return _Relay(None, None, (413, f"the body is larger than this server takes ({self.max_body} bytes)",
                                           "body_too_large"))
        scope = request.scope
        forwarded = {"method": scope["method"], "path": scope["path"], "root_path": scope.get("root_path", ""),
                     "query_string": scope.get("query_string", b""),
                     "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], "body": bytes(body)}
        return _Relay(self.server, forwarded)


class _Relay(Response):
    """The reply of the replica a forwarded request went to, as an ASGI response: its messages are
    sent on as they come. The client leaving cancels the replica's stream (and so the generation).
    A replica that dies before answering gets the client a 503 (OpenAI's error body, `Retry-After`;
    the openai client retries it); one that dies mid-stream ends the stream with an error event."""

    def __init__(self, server: Any, request: dict | None, error: tuple[int, str, str] | None = None) -> None:
        self.server, self.request, self.error = server, request, error
        self.background = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.error is not None:
            return await _error(send, *self.error)
        stream = self.server.remote(self.request)
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        started = streaming = False
        try:
            async for msg in _until(stream, watch):
                if msg["type"] == "http.response.start":
                    started = True
                    streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                    for k, v in msg.get("headers", []))
                await send(msg)
                if msg["type"] == "http.response.body" and not msg.get("more_body"):
                    break  # the reply is whole: a disconnect from here on is the client done reading
        except _ClientLeft:
            stream.cancel()
        except Exception as e:  # the replica died or could not be reached
            log.warning("forwarding %s %s failed: %r", self.request["method"], self.request["path"], e)
            message = f"the replica serving this request failed ({type(e).__name__}); retry the request"
            if not started:
                await _error(send, 503, message, "replica_unavailable")
            elif streaming:
                err = {"error": {"message": message, "type": "server_error", "param": None,
                                 "code": "replica_unavailable"}}
                await send({"type": "http.response.body", "body": b"data: " + json.dumps(err).encode() + b"\n\n",
                            "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.cancel()


class _ClientLeft(Exception):
    pass


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until(stream: Any, watch: asyncio.Future) -> AsyncIterator[dict]:
    """The stream's messages, until the client leaves (then _ClientLeft)."""
    it = stream.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        await asyncio.wait([nxt, watch], return_when=asyncio.FIRST_COMPLETED)
        if not nxt.done():
            nxt.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: not logged
            nxt.cancel()
            raise _ClientLeft()
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


async def _error(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def build_app(config: dict | RayServeConfig | None = None) -> Any:
    """The Serve application for `config` (see RayServeConfig): `serve.run(build_app(cfg))`."""
    cfg = RayServeConfig.from_dict(config.to_dict() if isinstance(config, RayServeConfig) else config)
    opts = cfg.deployment_options()
    if cfg.prefix_routing:
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixRouter, request_router_kwargs={"imbalance": cfg.imbalance or cfg.parallel},
            request_routing_stats_period_s=STATS_PERIOD_S)
    else:
        opts["request_router_config"] = RequestRouterConfig(request_routing_stats_period_s=STATS_PERIOD_S)
    server = PurelmServer.options(**opts).bind(cfg.to_dict())
    if not cfg.prefix_routing:
        return server
    return PurelmIngress.bind(server)


def app_builder(args: dict) -> Any:
    """`serve run` / `serve deploy` entry point (import_path: purelm.integrations.ray:app_builder);
    `args` are RayServeConfig's fields."""
    return build_app(dict(args or {}))
