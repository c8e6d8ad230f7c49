"""The gateway's fast path for participant sockets (services/gateway/fastpath.py).

`text_frame` builds the same bytes as websockets' own framing. Then the gateway's own
`Participants` and `Hub`, served by uvicorn with `SocketProtocol` on a loopback port, talk to
a real `websockets` client: frames both ways go past ASGI (the protocol counts them), and a
client that stops reading still gets every frame queued for it, in order, then the 1013 close
when its outbox overflowed. The broker and the store are fakes here (the e2e tests run the
same protocol in the real gateway process).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from services.common.bus import BATCH_TYPE, encode_batch
from services.common.directory import ParticipantInfo
from services.common.messages import Channel, Envelope, MessageType, PresenceChanged
from services.common.seats import derive_secret, new_key
from services.gateway.api import Participants, participant_router
from services.gateway.fastpath import SocketProtocol, text_frame
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

CODE = "0123456789abcdef0123"
KEY = new_key(derive_secret("", "t"))  # a seat key of the gateway below (admin token "t")
INFO = ParticipantInfo(
    participant=CODE, session="s", group="g", id_in_group=1, experiment="decisions"
)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_websockets_own_unmasked_frame(size: int) -> None:
    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


class FakeBus:
    """Confirms every batch at once, unless `confirming` is cleared (then frames wait for it);
    keeps the frames and presence changes published."""

    is_connected = True
    blocked = False

    def __init__(self) -> None:
        self.inputs: list[Envelope] = []
        self.presence: list[bool] = []
        self.changed = asyncio.Event()
        self.confirming = asyncio.Event()
        self.confirming.set()

    async def publish_batch(
        self, exchange: str, key: str, envelopes: list[Envelope], **_: Any
    ) -> None:
        if any(e.type is MessageType.FRAME_ACCEPTED for e in envelopes):
            await self.confirming.wait()
        for envelope in envelopes:
            if envelope.type is MessageType.PRESENCE_CHANGED:
                self.presence.append(PresenceChanged.of(envelope).connected)
            else:
                self.inputs.append(envelope)
        self.changed.set()

    async def until(self, done: Any) -> None:
        async with asyncio.timeout(5):
            while not done():
                self.changed.clear()
                await self.changed.wait()


class Signal:
    """Stands in for a counter of the metrics: says when it was counted."""

    def __init__(self) -> None:
        self.counted = asyncio.Event()

    def inc(self) -> None:
        self.counted.set()


class FakeDirectory:
    async def seat(self, key: str) -> ParticipantInfo:
        return INFO


@dataclass
class Gateway:
    url: str
    hub: Hub
    bus: FakeBus
    metrics: GatewayMetrics

    def bus_message(self, *envelopes: Envelope) -> None:
        body = encode_batch(list(envelopes))
        self.hub.on_message(SimpleNamespace(type=BATCH_TYPE, body=body))  # type: ignore[arg-type]

    async def connection(self) -> tuple[Connection, SocketProtocol]:
        """The connection once its presence is published, and its fast path."""
        await self.bus.until(lambda: self.bus.presence == [True])
        connection = self.hub.connections[CODE]
        assert isinstance(connection.socket, SocketProtocol)
        return connection, connection.socket

    def hello(self, connection: Connection) -> None:
        self.bus_message(
            Envelope(
                type=MessageType.CONTROL,
                session="s",
                group="g",
                participant=CODE,
                connection=connection.id,
                channel=Channel.HELLO,
                payload={"participant": CODE, "last_seq": 0},
            )
        )


def broadcast(index: int, pad: int = 0) -> Envelope:
    return Envelope(
        type=MessageType.BROADCAST,
        session="s",
        group="g",
        channel="group_decisions",
        payload={"i": index, "pad": "x" * pad},
    )


class Server(uvicorn.Server):
    """uvicorn's server, saying when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    # An inbox of 1 KiB holds two small frames (each counts its text + INBOX_FRAME_COST).
    settings = GatewaySettings(admin_token="t", outbox_limit=10, close_grace=5, inbox_bytes=1024)
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
    app = FastAPI()
    app.include_router(participant_router(participants))
    config = uvicorn.Config(
        app,
        ws=SocketProtocol,
        ws_per_message_deflate=False,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = Server(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    await asyncio.wait_for(server.listening.wait(), 5)
    try:
        yield Gateway(f"ws://127.0.0.1:{port}/ws/{KEY}", hub, bus, metrics)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await participants.close()
        listener.close()


async def frames(client: ClientConnection, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(5):
        return [json.loads(await client.recv()) for _ in range(count)]


async def test_frames_go_both_ways_past_asgi(gateway: Gateway) -> None:
    async with connect(gateway.url, proxy=None, compression=None) as client:
        connection, protocol = await gateway.connection()
        gateway.hello(connection)
        (hello,) = await frames(client, 1)
        assert hello["channel"] == "hello"
        for seq in (1, 2):
            await client.send(json.dumps({"channel": "decisions", "seq": seq, "payload": 0.5}))
        acks = await frames(client, 2)
        assert [(a["channel"], a["payload"]["seq"]) for a in acks] == [("ack", 1), ("ack", 2)]
        assert [e.seq for e in gateway.bus.inputs] == [1, 2]
        gateway.bus_message(broadcast(7))
        (group,) = await frames(client, 1)
        assert group["payload"]["i"] == 7
        await client.send(b"\x00binary")
        (error,) = await frames(client, 1)
        assert error["channel"] == "error" and error["payload"]["code"] == "bad_message"
        # hello, two acks, the broadcast, the error: all written straight to the transport;
        # the two decisions and the binary frame handed over in data_received.
        assert protocol.frames_written == 5
        assert protocol.frames_read == 3
    await gateway.bus.until(lambda: gateway.bus.presence == [True, False])


async def test_a_client_that_stops_reading_gets_its_queued_frames_then_1013(
    gateway: Gateway,
) -> None:
    # A small receive buffer and a one-message queue: the client soon stops taking frames
    # off the socket, the kernel's buffers fill, and the gateway's transport pauses.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gateway.url.split(":")[2].split("/")[0])))
    async with connect(gateway.url, sock=sock, proxy=None, compression=None, max_queue=1) as client:
        connection, protocol = await gateway.connection()
        sent = 0
        while not connection.closing:  # until its outbox overflows
            assert sent < 10_000, "the transport never paused"
            gateway.bus_message(broadcast(sent, pad=16_384))
            sent += 1
        direct = protocol.frames_written
        assert 0 < direct < sent
        received: list[int] = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    received.append(json.loads(await client.recv())["payload"]["i"])
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    # Every frame in order, up to the overflow: the refused one, and the newest queued one
    # that made room for the close frame, are the only ones missing (as before the fast path).
    assert received == list(range(sent - 2))
    slow = gateway.metrics.registry.get_sample_value("canopy_gateway_slow_clients_total")
    assert slow == 1


async def test_reading_stops_while_the_inbox_is_full_and_loses_nothing(gateway: Gateway) -> None:
    gateway.metrics.inbox_full = Signal()  # type: ignore[assignment]
    gateway.bus.confirming.clear()  # the broker confirms nothing for now
    async with connect(gateway.url, proxy=None, compression=None) as client:
        connection, protocol = await gateway.connection()
        gateway.hello(connection)
        await frames(client, 1)
        for seq in range(1, 51):
            await client.send(json.dumps({"channel": "decisions", "seq": seq, "payload": 0.5}))
        await asyncio.wait_for(gateway.metrics.inbox_full.counted.wait(), 5)  # type: ignore[attr-defined]
        # Full at once: the gateway took a few frames and stopped reading the socket.
        assert protocol.read_paused
        assert protocol.frames_read < 10
        gateway.bus.confirming.set()
        acks = await frames(client, 50)
        assert [a["payload"]["seq"] for a in acks] == list(range(1, 51))
        assert [e.seq for e in gateway.bus.inputs] == list(range(1, 51))
        assert protocol.frames_read == 50
        assert not protocol.read_paused


async def test_frames_read_before_a_close_are_all_published(gateway: Gateway) -> None:
    """Fifty frames and the close frame in one TCP segment, while the broker confirms nothing:
    the gateway takes two (its inbox is full), keeps the rest it read, and still publishes
    every one once the broker confirms, as when each waited in uvicorn's queue for `receive`
    ahead of the disconnect."""
    gateway.metrics.inbox_full = Signal()  # type: ignore[assignment]
    gateway.bus.confirming.clear()
    client = ClientProtocol(parse_uri(gateway.url))
    client.send_request(client.connect())
    host, port = gateway.url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"".join(client.data_to_send()))
        async with asyncio.timeout(5):
            while not any(isinstance(e, Response) for e in client.events_received()):
                client.receive_data(await reader.read(65536))
        connection, protocol = await gateway.connection()
        gateway.hello(connection)
        for seq in range(1, 51):
            client.send_text(
                json.dumps({"channel": "decisions", "seq": seq, "payload": 1}).encode()
            )
        client.send_close(1000)
        writer.write(b"".join(client.data_to_send()))  # one write: one segment on loopback
        await asyncio.wait_for(gateway.metrics.inbox_full.counted.wait(), 5)  # type: ignore[attr-defined]
        gateway.bus.confirming.set()
        await gateway.bus.until(lambda: gateway.bus.presence == [True, False])
        assert [e.seq for e in gateway.bus.inputs] == list(range(1, 51))
        assert protocol.frames_read == 50
    finally:
        writer.close()
