"""A participant socket that stops taking frames, driven in-process through the gateway's own
`Participants.serve` with a fake socket, bus and directory (no broker, no network).

Over a real network a socket that reads nothing first fills megabytes of kernel buffers; here
it blocks at once, which is the case that matters: the outbox overflows while the writer is
stuck in a send, and the gateway must still let go of the connection (1013), publish the
disconnect and free it within `close_grace`, without waiting for the peer.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.websockets import WebSocketState

from services.common.bus import BATCH_TYPE, encode_batch
from services.common.directory import ParticipantInfo
from services.common.messages import Envelope, MessageType, PresenceChanged
from services.common.seats import derive_secret, new_key
from services.gateway.api import Participants
from services.gateway.handlers import Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

CODE = "0123456789abcdef0123"
KEY = new_key(derive_secret("", "t"))  # a seat key of the gateway below (admin token "t")
INFO = ParticipantInfo(
    participant=CODE, session="s", group="g", id_in_group=1, experiment="decisions"
)


class StuckSocket:
    """Takes `takes` frames, then blocks every send until `unblock()`; receives `incoming`,
    then waits (a browser that says nothing) until the server closes."""

    def __init__(self, takes: int, incoming: list[str] | None = None) -> None:
        self.headers: dict[str, str] = {}
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[str] = []
        self.closed_with: int | None = None
        self._takes = takes
        self._unblocked = asyncio.Event()
        self._closed = asyncio.Event()
        self._incoming = list(incoming or [])
        self.waiting = asyncio.Event()  # the server is reading, and there is nothing to read

    def unblock(self) -> None:
        self._unblocked.set()

    async def accept(self) -> None:
        pass

    async def send_text(self, text: str) -> None:
        if len(self.sent) >= self._takes:
            await self._unblocked.wait()
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code
        self.application_state = WebSocketState.DISCONNECTED
        self._closed.set()

    async def receive(self) -> dict[str, Any]:
        if self._incoming:
            return {"type": "websocket.receive", "text": self._incoming.pop(0)}
        self.waiting.set()
        await self._closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}


class FakeBus:
    is_connected = True
    blocked = False

    def __init__(self) -> None:
        self.presence: list[bool] = []
        self.changed = asyncio.Event()

    async def publish_batch(
        self, exchange: str, key: str, envelopes: list[Envelope], **_: Any
    ) -> None:
        for envelope in envelopes:
            if envelope.type is MessageType.PRESENCE_CHANGED:
                self.presence.append(PresenceChanged.of(envelope).connected)
                self.changed.set()


class FakeDirectory:
    async def seat(self, key: str) -> ParticipantInfo:
        return INFO


def broadcasts(count: int) -> SimpleNamespace:
    """One bus message with `count` group broadcasts, as decisions sends them."""
    envelopes = [
        Envelope(
            type=MessageType.BROADCAST,
            session="s",
            group="g",
            channel="group_decisions",
            payload={CODE: i},
        )
        for i in range(count)
    ]
    return SimpleNamespace(type=BATCH_TYPE, body=encode_batch(envelopes))


@pytest.fixture
def gateway() -> tuple[Participants, Hub, FakeBus, GatewayMetrics]:
    settings = GatewaySettings(admin_token="t", outbox_limit=10, close_grace=0.3)
    metrics = GatewayMetrics()
    hub = Hub(metrics)
    bus = FakeBus()
    participants = Participants(
        settings,
        bus,  # type: ignore[arg-type]
        FakeDirectory(),  # type: ignore[arg-type]
        hub,
        metrics,
        gateway="gw",
    )
    return participants, hub, bus, metrics


async def connected(bus: FakeBus, expected: list[bool]) -> None:
    async with asyncio.timeout(5):
        while bus.presence != expected:
            bus.changed.clear()
            await bus.changed.wait()


def slow_clients(metrics: GatewayMetrics) -> float:
    value = metrics.registry.get_sample_value("canopy_gateway_slow_clients_total")
    return 0.0 if value is None else value


async def test_a_socket_that_takes_nothing_is_let_go(gateway: Any) -> None:
    participants, hub, bus, metrics = gateway
    socket = StuckSocket(takes=0)
    serving = asyncio.create_task(participants.serve(socket, KEY))
    await asyncio.wait_for(socket.waiting.wait(), 5)
    hub.on_message(broadcasts(25))  # more than the outbox holds, while the writer is stuck
    # Reading stops, the group learns of the disconnect, and the connection is freed
    # within close_grace (0.3 s) although the peer took nothing, not even the close frame.
    async with asyncio.timeout(3):
        await serving
    assert bus.presence == [True, False]
    assert CODE not in hub.connections
    assert socket.closed_with is None
    assert slow_clients(metrics) == 1
    await participants.close()


async def test_a_socket_that_reads_again_in_time_gets_1013(gateway: Any) -> None:
    participants, hub, bus, _ = gateway
    socket = StuckSocket(takes=2)
    serving = asyncio.create_task(participants.serve(socket, KEY))
    await asyncio.wait_for(socket.waiting.wait(), 5)
    hub.on_message(broadcasts(25))
    await connected(bus, [True, False])  # given up on: the others know at once
    socket.unblock()  # it reads again, within close_grace
    async with asyncio.timeout(3):
        await serving
    assert socket.closed_with == 1013
    assert 2 <= len(socket.sent) <= 12  # what it had taken, then what was queued: no more


async def test_answers_to_a_flood_it_does_not_read_close_it_with_1013(gateway: Any) -> None:
    """Errors and acks count against the outbox too: a client that floods without reading
    its answers is closed (before this, they were dropped silently and it stayed open)."""
    participants, hub, bus, metrics = gateway
    flood = [json.dumps({"channel": "chat", "payload": i, "seq": i}) for i in range(1, 500)]
    socket = StuckSocket(takes=1, incoming=flood)
    serving = asyncio.create_task(participants.serve(socket, KEY))
    await connected(bus, [True, False])
    socket.unblock()
    async with asyncio.timeout(3):
        await serving
    assert socket.closed_with == 1013
    assert slow_clients(metrics) == 1
    # It stopped reading the flood at the overflow: most of it was never even parsed.
    assert len(socket._incoming) > 400
    assert CODE not in hub.connections


async def test_while_the_broker_is_away_connections_are_told_to_come_back(gateway: Any) -> None:
    """Nothing could be acknowledged: 1013 at once, instead of accepting the connection and
    dropping it (1011) at its first frame, over and over while the broker restarts."""
    participants, hub, bus, metrics = gateway
    bus.is_connected = False
    socket = StuckSocket(takes=10)
    async with asyncio.timeout(3):
        await participants.serve(socket, KEY)
    assert socket.closed_with == 1013
    assert bus.presence == []
    assert CODE not in hub.connections
    refused = metrics.registry.get_sample_value(
        "canopy_gateway_connects_total", {"outcome": "broker_unavailable"}
    )
    assert refused == 1
