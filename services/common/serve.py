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

Idle wake-ups: uvicorn's main loop wakes 10 times a second to check for a stop and refreshes
the `Date` header on every tenth wake. Here it wakes once a second, on the second (the header's
resolution), and a stop or the drain's end wakes it at once instead (`_poke`): 9 wakes a second
fewer in each service, with nothing to do in them, and a stop seen no later than before. In
`make bench ARGS="--groups 25 --size 4 --rate 2 --duration 5 --idle 20 --no-floor"` the idle
services' context switches fell from 13-15 to 4-8 a second (gateway, timers, store) and from
23-25 to 14-16 (decisions, with its lease renewals batched too); their idle CPU, medians of
quiet runs, gateway 0.7 -> 0.4, timers 0.7 -> 0.5, store 0.6 -> 0.3 % of a core.
"""

from __future__ import annotations

import asyncio
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
        self._loop: asyncio.AbstractEventLoop | None = None  # main_loop's, while it runs
        self._wake: asyncio.Future[None] | None = None  # main_loop's sleep
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._drain_until: float | None = None

    # uvicorn sets `should_exit` (its signal handler, or a test from another thread) and polls
    # it every 0.1 s; here setting it wakes main_loop, which otherwise sleeps a second.
    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self._poke_soon()

    def _poke_soon(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._poke)  # safe from a signal handler or a thread

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

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
            self._poke_soon()  # main_loop sleeps until the drain's end, not a second more
            return
        super().handle_exit(sig, frame)

    async def main_loop(self) -> None:
        """uvicorn's loop, waking once a second (on the second) instead of ten times: the
        `Date` header (second resolution) is renewed on each wake, as uvicorn renews it every
        tenth; a stop (`should_exit`) or the drain's end wakes it when it is due."""
        loop = self._loop = asyncio.get_running_loop()
        counter = 0  # uvicorn's on_tick renews the header when counter % 10 == 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            self._wake = loop.create_future()
            delay = 1.0 - time.time() % 1.0  # to the next second
            if self._drain_until is not None:
                delay = min(delay, max(0.0, self._drain_until - time.monotonic()))
            timer = loop.call_later(delay, self._poke)
            if self.should_exit:  # set before the future existed
                self._poke()
            try:
                await self._wake
            finally:
                timer.cancel()
                self._wake = None
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)

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
