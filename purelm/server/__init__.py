"""`purelm serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `server` extra:
pip install 'purelm[server]')."""
from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time
from typing import Any

from ..errors import PurelmError
from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "serve"]


def serve(llm: Any, host: str = "127.0.0.1", port: int = 8080, config: ServerConfig | None = None,
          sock: socket.socket | None = None, log_level: str = "info") -> None:
    """Serve `llm` until interrupted: uvicorn in a background thread, the engine in this one (the
    main thread: numba's parallel kernels start faster there, see Engine.run)."""
    import uvicorn

    config = dataclasses.replace(config or ServerConfig(), engine_thread=False)
    app = create_app(llm, config)
    engine = app.state.purelm.engine
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=3))
    http = threading.Thread(target=server.run, kwargs=dict(sockets=[sock] if sock is not None else None),
                            name="purelm-http", daemon=True)
    engine._active = True  # take requests from the first moment the HTTP side listens
    http.start()
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: stop as uvicorn would
        old_term = signal.signal(signal.SIGTERM, lambda signum, frame: engine.stop(timeout=0))
    try:
        engine.run(until=lambda: not http.is_alive())
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        server.should_exit = True
        t0 = time.monotonic()
        while http.is_alive() and time.monotonic() - t0 < 5:
            http.join(0.1)
    if not server.started:
        raise PurelmError(f"could not serve on {host}:{port} (see the message above)")
