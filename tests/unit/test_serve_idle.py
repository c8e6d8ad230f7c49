"""The services' uvicorn server (services/common/serve.py) when nobody calls it: its main loop
wakes once a second, not ten times, and a stop or the drain's end is still seen at once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from email.utils import parsedate_to_datetime

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from services.common.serve import DrainingServer


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class _Counting(DrainingServer):
    ticks = 0
    ticked: asyncio.Event | None = None  # set at each tick (a test clears it to wait for one)

    async def on_tick(self, counter: int) -> bool:
        self.ticks += 1
        if self.ticked is not None:
            self.ticked.set()
        return await super().on_tick(counter)

    async def next_tick(self) -> float:
        """Wait for the loop's next wake; its loop time."""
        self.ticked = self.ticked or asyncio.Event()
        self.ticked.clear()
        await asyncio.wait_for(self.ticked.wait(), 5)
        return asyncio.get_running_loop().time()


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(10):
        while not server.started:
            assert not task.done(), "the server stopped while starting"
            await asyncio.sleep(0.01)


async def test_main_loop_wakes_once_a_second_and_stops_at_once() -> None:
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", log_config=None)
    server = _Counting(config, _app, drain_seconds=0)
    task = asyncio.create_task(server.serve())
    await _started(server, task)
    # Three wakes in a row: uvicorn's own loop wakes every 0.1 s, ours once a second.
    first = await server.next_tick()
    await server.next_tick()
    last = await server.next_tick()
    assert last - first > 1.5, f"the main loop woke 3 times in {last - first:.2f} s"
    # The Date header is still renewed each second (uvicorn's on_tick, counter % 10 == 0).
    date = dict(server.server_state.default_headers)[b"date"].decode()
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 1.5
    stopping = time.monotonic()
    server.should_exit = True  # as uvicorn's signal handler does
    async with asyncio.timeout(5):
        await task
    assert time.monotonic() - stopping < 0.3  # not the rest of a one-second sleep


SERVE = """
import sys, uvicorn
from services.common.serve import DrainingServer

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off",
                        log_config=None, loop="uvloop", http="httptools")
DrainingServer(config, app, float(sys.argv[2])).run()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("drain", [0.0, 0.4])
def test_sigterm_stops_when_the_drain_ends_not_a_tick_later(drain: float) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(port), str(drain)], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:  # up once it answers
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "never answered"
            time.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # A drain ends on time (the loop is woken for it), and without one the stop is prompt: a
    # one-second tick would show here as up to a second more.
    assert drain <= took < drain + 0.35, took
