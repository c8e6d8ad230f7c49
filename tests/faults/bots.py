"""Scripted participants that behave as the JS client does when things fail.

A `Bot` speaks PROTOCOL.md only: it reconnects with backoff whenever its socket closes, keeps
every frame that was not acknowledged and resends it with the same `seq` after each `hello`
(dropping those at or below `hello.last_seq`, which the log already holds), and sends a new
decision at a steady rate while its period runs. It records what it was told, with arrival
times, so a test can say what was acknowledged, when broadcasts resumed, and when periods
ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from tests.e2e.protocol import ws_url


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    channel: str
    payload: Any


@dataclass
class Bot:
    gateway_url: str
    code: str
    rate: float = 10.0  # decisions per second while the period runs
    num_periods: int = 1
    acked: set[int] = field(default_factory=set)
    unacked: dict[int, Any] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    connects: int = 0
    _ws: ClientConnection | None = None
    _seq: int = 0
    _running: bool = False
    _synced: bool = False  # hello seen and unacked frames resent on the current socket
    _ended: asyncio.Event = field(default_factory=asyncio.Event)
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._connect_loop()),
            asyncio.create_task(self._send_loop()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    async def wait_started(self, timeout: float) -> None:
        await asyncio.wait_for(self._started.wait(), timeout)

    async def wait_ended(self, timeout: float) -> None:
        """Until `period_end` of the last period arrived."""
        await asyncio.wait_for(self._ended.wait(), timeout)

    async def wait_for(self, what: str, check: Any, timeout: float) -> None:
        """Until `check()` holds; re-checked after every frame this bot receives."""
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    # -- views ---------------------------------------------------------------------------

    def payloads(self, channel: str, since: float = float("-inf")) -> list[Any]:
        return [r.payload for r in self.received if r.channel == channel and r.at >= since]

    def first(self, channel: str, since: float) -> float | None:
        return next((r.at for r in self.received if r.channel == channel and r.at >= since), None)

    # -- the socket ----------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        delay = 0.05
        while True:
            try:
                async with websockets.connect(
                    ws_url(self.gateway_url, self.code), open_timeout=5, max_queue=None
                ) as ws:
                    self._ws = ws
                    self.connects += 1
                    delay = 0.05
                    await self._read(ws)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                self.closes.append(code)
            finally:
                self._ws, self._synced = None, False
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(2 * delay, 1.0)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            channel, payload = frame["channel"], frame["payload"]
            self.received.append(Received(time.monotonic(), channel, payload))
            if channel == "hello":
                last_seq = int(payload["last_seq"])
                for seq in [s for s in self.unacked if s <= last_seq]:
                    self.acked.add(seq)
                    del self.unacked[seq]
                self._seq = max(self._seq, last_seq)
                period = payload["period"]
                self._running = period["state"] == "running"
                if self._running:
                    self._started.set()
                # Resend what is unacked, in seq order, before any new frame: a seq at or
                # below one the server already took counts as a duplicate.
                for seq, value in sorted(self.unacked.items()):
                    await ws.send(self._frame(seq, value))
                self._synced = True
            elif channel == "ack":
                seq = int(payload["seq"])
                self.acked.add(seq)
                self.unacked.pop(seq, None)
            elif channel == "period_start":
                self._running = True
                self._started.set()
            elif channel == "period_end":
                self._running = False
                if int(payload["period"]) >= self.num_periods:
                    self._ended.set()
            self._changed.set()

    async def _send_loop(self) -> None:
        interval = 1.0 / self.rate  # the bot's pace, not a synchronisation
        while not self._ended.is_set():
            await asyncio.sleep(interval)
            if not self._running:
                continue
            self._seq += 1
            value = round(random.random(), 4)
            self.unacked[self._seq] = value
            ws = self._ws
            if ws is not None and self._synced:
                with contextlib.suppress(websockets.WebSocketException):
                    await ws.send(self._frame(self._seq, value))

    @staticmethod
    def _frame(seq: int, value: Any) -> str:
        return json.dumps({"channel": "decisions", "payload": value, "seq": seq})
