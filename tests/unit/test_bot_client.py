"""The bot's client-side seq rules (services/bots/client.py) against scripted sockets: what
it sends after a `hello`, without a gateway. The same rules run against the real stack in the
e2e tests that use bots."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, cast

from websockets.asyncio.client import ClientConnection

from services.bots.client import Bot


class ScriptedSocket:
    """Delivers the given server frames in order, then ends; records what the bot sends."""

    def __init__(self, *frames: tuple[str, Any]) -> None:
        self.frames = [json.dumps({"channel": c, "payload": p, "ts": 1.0}) for c, p in frames]
        self.sent: list[dict[str, Any]] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        for frame in self.frames:
            yield frame

    async def send(self, data: str) -> None:
        self.sent.append(json.loads(data))


def hello(last_seq: int) -> tuple[str, dict[str, Any]]:
    period = {"number": 1, "state": "waiting", "ends_at": None}
    return "hello", {"participant": "p1", "members": ["p1", "p2"], "period": period,
                     "group_decisions": {}, "last_seq": last_seq}  # fmt: skip


async def read(bot: Bot, socket: ScriptedSocket) -> None:
    bot._ws = cast(ClientConnection, socket)  # what `_connect_loop` does for a new socket
    await bot._read(cast(ClientConnection, socket))


async def test_an_older_hello_never_makes_the_bot_resend_or_renumber() -> None:
    bot = Bot("ws://canopy.test/ws/a-seat-key")
    for value in range(1, 6):
        await bot.send("decisions", value / 10)  # not connected yet: all wait in the outbox
    first = ScriptedSocket(hello(0), ("ack", {"seq": 5}))
    await read(bot, first)
    assert [f["seq"] for f in first.sent] == [1, 2, 3, 4, 5]

    # Acks confirm everything up to their seq (PROTOCOL: after `ack n`, last_seq >= n); a
    # hello saying less (overtaken, from an older connection) must not bring 1..4 back.
    second = ScriptedSocket(hello(3))
    await read(bot, second)
    assert second.sent == [], "nothing at or below the acked seq 5 is sent again"
    assert bot.unacked == {} and bot.acked == {1, 2, 3, 4, 5}
    assert await bot.send("decisions", 0.6) == 6
    assert [f["seq"] for f in second.sent] == [6]
    assert [h.last_seq for h in bot.hellos] == [0, 3]  # what the server said, as it said it


async def test_sockets_closed_before_a_hello_back_off_further_each_time(
    monkeypatch: Any,
) -> None:
    """A gateway that accepts a socket and closes it at once (1013 while its broker connection
    is restored) gets the bots back ever more slowly, as canopy.js: the backoff starts again
    only after a socket that got its hello (before: after every socket that opened, so every
    bot came back every 0.25 s; the partition test saw ~150 attempts per gateway in 2 s)."""
    import asyncio

    from websockets.asyncio.server import ServerConnection, serve

    import services.bots.client as client

    real_sleep = asyncio.sleep
    waits: list[float] = []
    enough = asyncio.Event()

    class Clock:
        """The module's `asyncio`, with backoff sleeps recorded and not waited out."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        async def sleep(self, seconds: float) -> None:
            waits.append(seconds)
            if len(waits) >= 6:
                enough.set()
            await real_sleep(0)

    async def refuse(socket: ServerConnection) -> None:
        await socket.close(1013, "try again later")

    monkeypatch.setattr(client, "asyncio", Clock())
    async with serve(refuse, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        bot = Bot(f"ws://127.0.0.1:{port}/ws/a-seat-key", min_delay=0.25, max_delay=5.0)
        loop = asyncio.get_running_loop().create_task(bot._connect_loop())
        try:
            await asyncio.wait_for(enough.wait(), 10)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    assert bot.closes[:6] == [1013] * 6
    for attempt, waited in enumerate(waits[:6]):
        nominal = min(5.0, 0.25 * 2**attempt)
        assert nominal / 2 <= waited <= nominal, (attempt, waits)
