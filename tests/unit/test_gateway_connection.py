"""A gateway connection's way out (services/gateway/handlers.py `Connection`): frames are
written in the caller's step while the socket takes them, queue behind a write that has to
wait, and come out in the order they were sent."""

from __future__ import annotations

import asyncio

import pytest
from starlette.websockets import WebSocketState

from services.common.directory import ParticipantInfo
from services.gateway.handlers import Connection

INFO = ParticipantInfo(
    participant="p1", session="s", group="g", id_in_group=1, experiment="decisions"
)


class Socket:
    """Takes frames at once until `block()`, then makes every send wait until `unblock()`
    (a transport paused by a browser that reads slowly); `fail()` makes sends raise."""

    def __init__(self) -> None:
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[str] = []
        self.closed_with: int | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._error: Exception | None = None
        self.waits = 0
        self.wrote = asyncio.Event()  # set on every frame written

    def block(self) -> None:
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    def fail(self) -> None:
        self._error = OSError("connection reset")

    async def send_text(self, text: str) -> None:
        if not self._open.is_set():
            self.waits += 1
            await self._open.wait()
        if self._error is not None:
            raise self._error
        self.sent.append(text)
        self.wrote.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code
        self.application_state = WebSocketState.DISCONNECTED


def connection(socket: Socket, limit: int = 100) -> tuple[Connection, list[float]]:
    conn = Connection(socket, INFO, limit)  # type: ignore[arg-type]
    delivered: list[float] = []
    conn.on_delivered = delivered.append
    return conn, delivered


def blocked(socket: Socket, limit: int = 100) -> tuple[Connection, asyncio.Task[None]]:
    """A connection with its writer task running, on a socket that makes sends wait."""
    conn, _ = connection(socket, limit)
    writer = asyncio.create_task(conn.write_loop())
    socket.block()
    return conn, writer


async def test_a_socket_that_takes_frames_gets_them_without_the_writer() -> None:
    socket = Socket()
    conn, delivered = connection(socket)
    # No writer task at all: frames are written in send()'s own step.
    assert conn.send("a", origin=0.0) and conn.send("b")
    assert socket.sent == ["a", "b"]
    assert conn.outbox.qsize() == 0
    assert len(delivered) == 1  # only "a" had an origin to measure from


async def test_frames_queue_behind_a_write_that_waits_and_keep_their_order() -> None:
    socket = Socket()
    conn, delivered = connection(socket)
    writer = asyncio.create_task(conn.write_loop())
    conn.send("1")
    socket.block()
    for frame in ("2", "3", "4"):
        assert conn.send(frame, origin=0.0)
    assert socket.sent == ["1"]
    assert conn.outbox.qsize() == 3  # the write under way, then the two behind it
    await asyncio.sleep(0)  # the writer takes over the suspended write and waits with it
    conn.send("5")
    socket.unblock()
    async with asyncio.timeout(2):
        while len(socket.sent) < 5:
            socket.wrote.clear()
            await socket.wrote.wait()
    assert socket.sent == ["1", "2", "3", "4", "5"]
    assert socket.waits == 1  # "2" waited once; the rest went out once it could
    assert len(delivered) == 3
    # Caught up: the next frame is written at once again.
    await asyncio.sleep(0)
    conn.send("6")
    assert socket.sent[-1] == "6"
    conn.close(1000)
    await asyncio.wait_for(writer, 2)
    assert socket.closed_with == 1000


async def test_a_browser_too_far_behind_is_refused_and_closed_once_it_reads() -> None:
    socket = Socket()
    conn, writer = blocked(socket, limit=3)
    results = [conn.send(str(i)) for i in range(5)]
    # The suspended write and two more fill the outbox of 3; the rest are refused.
    assert results == [True, True, True, False, False]
    conn.close(1013, "too far behind")
    socket.unblock()
    await asyncio.wait_for(writer, 2)
    # The write under way finished; the newest frame made room for the close.
    assert socket.sent == ["0", "1"]
    assert socket.closed_with == 1013


async def test_a_failed_write_drops_later_frames_and_skips_the_close() -> None:
    socket = Socket()
    conn, _ = connection(socket)
    writer = asyncio.create_task(conn.write_loop())
    socket.fail()
    assert conn.send("lost")  # the browser is gone: nothing to tell it
    assert conn.send("also lost")
    assert socket.sent == [] and conn.outbox.qsize() == 0
    conn.close(1000)
    await asyncio.wait_for(writer, 2)
    assert socket.closed_with is None


async def test_a_write_that_fails_after_waiting_ends_the_writer() -> None:
    socket = Socket()
    conn, writer = blocked(socket)
    conn.send("x")
    conn.send("y")
    await asyncio.sleep(0)
    socket.fail()
    socket.unblock()
    await asyncio.wait_for(writer, 2)
    assert socket.sent == []
    assert conn.send("z")  # accepted and dropped: the reader closes the connection


async def test_cancelling_the_writer_closes_a_write_that_waits() -> None:
    socket = Socket()
    conn, writer = blocked(socket)
    conn.send("stuck")
    await asyncio.sleep(0)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    socket.unblock()
    await asyncio.sleep(0)
    assert socket.sent == []  # the write was closed, not left to finish later
