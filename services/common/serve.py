"""Entry-point helper: run a service's ASGI app with uvicorn (uvloop, httptools) from settings.

Graceful drain: on SIGTERM with `CANOPY_DRAIN_SECONDS` > 0, the service first answers
`/readyz` with 503 ("draining") for that long, so that a load balancer (a Kubernetes Service)
stops sending it new work, and only then stops as uvicorn does: no new connections, open
WebSockets closed with 1012 ("service restart", the browser reconnects elsewhere), requests in
flight finished, then the app's lifespan shutdown (decisions hands its shards over, the store
finishes its batch, timers releases its lease). A second signal, or SIGINT (Ctrl-C), stops at
once.

Garbage collection: once the app has started, everything allocated so far (modules, FastAPI
routes, pydantic validators: nearly all of a service's heap) is moved out of the collector's
reach with `gc.freeze()`. Before, each full collection walked that heap again and stopped the
service for 50-60 ms (measured with a `gc.callbacks` probe in `make bench` at 400 participants:
every full collection of decisions or of the gateway showed up as a stall of the decisions sent
during it). Cycles made afterwards are still collected; a startup object that ends up in
garbage cycles later (the first broker connection's objects after a reconnect) is not: a
bounded, one-off cost.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from services.common.logs import configure_logging
from services.common.settings import CommonSettings


def instance_name(settings: CommonSettings) -> str:
    return settings.instance or f"{socket.gethostname()}-{os.getpid()}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a readiness-first drain on SIGTERM (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: ASGIApp, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._drain_until: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        gc.collect()
        gc.freeze()  # see the module docstring

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_seconds > 0 and self._drain_until is None:
            self._captured_signals.append(sig)
            self._drain_until = time.monotonic() + self._drain_seconds
            state = getattr(self._app, "state", None)
            if state is not None:
                state.draining = True  # /readyz answers 503 from now on
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(
    app: Any, settings: CommonSettings, *, service: str, port: int, **uvicorn_options: Any
) -> None:
    configure_logging(service, instance_name(settings), settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        lifespan="on",
        **uvicorn_options,
    )
    DrainingServer(config, app, settings.drain_seconds).run()
