"""The gateway when the broker takes nothing (issue 23, "Backpressure"), driven in-process through
`Participants.serve` with a fake socket, bus and directory, as test_gateway_slow_socket.py.

- A browser that keeps sending while its frames cannot be published (RabbitMQ blocks the
  gateway: no confirm comes) is no longer read past its inbox's bound (CANOPY_INBOX_BYTES):
  its frames wait in the socket. Before, the gateway read and parsed every one into an
  unbounded inbox, so memory grew with what browsers sent for as long as the block lasted.
  Once the broker confirms again, every frame is published and acked, in order.
- While the bus is blocked, a new socket is closed with 1013 before anything is published.

The real alarm: tests/faults/test_backpressure.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
from starlette.websockets import WebSocket, WebSocketState

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
FRAMES = 400
PAD = "x" * 1000  # each frame about 1 KB of text
INBOX_BYTES = 4096


class SendingSocket:
    """A browser with `incoming` frames to send at once; then silent until closed."""

    def __init__(self, incoming: list[str]) -> None:
        self.headers: dict[str, str] = {}
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.incoming = list(incoming)
        self._closed = asyncio.Event()
        self.acked = asyncio.Event()  # set when every frame was acked

    async def accept(self) -> None:
        pass

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))
        if len([f for f in self.sent if f["channel"] == "ack"]) >= FRAMES:
            self.acked.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code
        self.application_state = WebSocketState.DISCONNECTED
        self._closed.set()

    async def receive(self) -> dict[str, Any]:
        if self.incoming:
            return {"type": "websocket.receive", "text": self.incoming.pop(0)}
        await self._closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}


class HeldBus:
    """Confirms presence at once, and frames only once `release()`d (a broker that blocks
    publishers confirms nothing)."""

    is_connected = True

    def __init__(self, *, blocked: bool = False) -> None:
        self.blocked = blocked
        self.presence: list[bool] = []
        self.frames: list[int] = []
        self.holding = asyncio.Event()  # a batch of frames waits for its confirm
        self.announced = asyncio.Event()  # a presence was published
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def publish_batch(
        self, exchange: str, key: str, envelopes: list[Envelope], **_: Any
    ) -> None:
        frames = [e for e in envelopes if e.type is MessageType.FRAME_ACCEPTED]
        if frames:
            self.holding.set()
            await self._released.wait()
            self.frames += [e.seq or 0 for e in frames]
        self.presence += [
            PresenceChanged.of(e).connected
            for e in envelopes
            if e.type is MessageType.PRESENCE_CHANGED
        ]
        if self.presence:
            self.announced.set()


class FakeDirectory:
    async def seat(self, key: str) -> ParticipantInfo:
        return INFO


def gateway(bus: HeldBus) -> tuple[Participants, Hub, GatewayMetrics]:
    settings = GatewaySettings(
        admin_token="t",
        inbox_bytes=INBOX_BYTES,
        max_frames_per_second=100_000,  # the flood limit is not what this test is about
        hello_timeout=0.01,  # no decisions here to send a hello
    )
    metrics = GatewayMetrics()
    hub = Hub(metrics)
    participants = Participants(
        settings,
        bus,  # type: ignore[arg-type]
        FakeDirectory(),  # type: ignore[arg-type]
        hub,
        metrics,
        gateway="gw",
    )
    return participants, hub, metrics


def frames() -> list[str]:
    return [
        json.dumps({"channel": "decisions", "payload": PAD, "seq": seq})
        for seq in range(1, FRAMES + 1)
    ]


async def test_frames_the_broker_does_not_take_are_left_in_the_socket() -> None:
    bus = HeldBus()
    participants, _, metrics = gateway(bus)
    socket = SendingSocket(frames())
    serving = asyncio.create_task(participants.serve(cast(WebSocket, socket), KEY))
    await asyncio.wait_for(bus.holding.wait(), 5)
    # Everything the gateway could do without the broker, it has done: the reader now
    # waits for room (or, before the fix, had read every frame).
    for _ in range(100):
        await asyncio.sleep(0)  # lets the reader run as far as it will (no timing involved)
    read = FRAMES - len(socket.incoming)
    # The frame being published, and the inbox's 4 KB: four frames of about 1.5 KB counted.
    assert read <= 1 + INBOX_BYTES // 1000 + 1, f"{read} of {FRAMES} frames read"
    full = metrics.registry.get_sample_value("canopy_gateway_inbox_full_total")
    assert full is not None and full >= 1

    bus.release()  # the alarm clears: every frame is published and acked, in order
    await asyncio.wait_for(socket.acked.wait(), 10)
    assert bus.frames == list(range(1, FRAMES + 1))
    acks = [f["payload"]["seq"] for f in socket.sent if f["channel"] == "ack"]
    assert acks == list(range(1, FRAMES + 1))
    await socket.close()
    async with asyncio.timeout(5):
        await serving
    assert bus.presence == [True, False]
    await participants.close()


@pytest.mark.parametrize("blocked", [True, False])
async def test_while_the_broker_blocks_publishers_new_sockets_get_1013(blocked: bool) -> None:
    bus = HeldBus(blocked=blocked)
    bus.release()
    participants, hub, metrics = gateway(bus)
    socket = SendingSocket([])
    serving = asyncio.create_task(participants.serve(cast(WebSocket, socket), KEY))
    if blocked:
        async with asyncio.timeout(3):
            await serving
        assert socket.closed_with == 1013
        assert bus.presence == []  # nothing published, nothing waiting for a confirm
        assert CODE not in hub.connections
        refused = metrics.registry.get_sample_value(
            "canopy_gateway_connects_total", {"outcome": "broker_blocked"}
        )
        assert refused == 1
    else:
        await asyncio.wait_for(bus.announced.wait(), 3)
        assert bus.presence == [True]
        assert CODE in hub.connections
        await socket.close()
        async with asyncio.timeout(3):
            await serving
    await participants.close()
