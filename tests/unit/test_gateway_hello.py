"""A `hello` never says less than the acks its connection already sent (PROTOCOL v2 "The ack
holds through everything"), in-process: the gateway's own `Participants._accept` and `Hub`, a
bus that confirms at once, a socket that keeps what it is sent.

A resync's hello is decisions' state where the connection's presence stands in the group's
order; frames the connection sent after that presence are acked on their confirm before
decisions gets to it, so the `last_seq` decisions puts in that hello can be below them
(tests/faults/test_ack_then_hello.py shows it on the real stack).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.websockets import WebSocketState

from services.common.directory import ParticipantInfo
from services.common.messages import Channel, Envelope, InboundFrame, MessageType
from services.gateway.api import Participants
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

INFO = ParticipantInfo(
    participant="p1", session="s", group="g", id_in_group=1, experiment="decisions"
)


class Socket:
    def __init__(self) -> None:
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[dict[str, Any]] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


class ConfirmingBus:
    """Confirms every batch at once, keeping the inputs in the order they were published."""

    is_connected = True
    blocked = False

    def __init__(self) -> None:
        self.inputs: list[Envelope] = []

    async def publish_batch(
        self, exchange: str, key: str, envelopes: list[Envelope], **_: Any
    ) -> None:
        self.inputs.extend(envelopes)


@pytest.fixture
async def gateway() -> tuple[Participants, Hub, ConfirmingBus, Connection, Socket]:
    metrics = GatewayMetrics()
    hub = Hub(metrics)
    bus = ConfirmingBus()
    participants = Participants(
        GatewaySettings(admin_token="t"),
        bus,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no look-ups here
        hub,
        metrics,
        gateway="gw",
    )
    socket = Socket()
    connection = Connection(socket, INFO, 100)  # type: ignore[arg-type]
    hub.add(connection)
    return participants, hub, bus, connection, socket


def hello(hub: Hub, connection: Connection, last_seq: int) -> None:
    """Decisions' hello for `connection`, as it arrives on the gateway's queue."""
    payload = {"participant": "p1", "group": "g", "group_decisions": {"p1": 0.5}}
    envelope = Envelope(
        type=MessageType.CONTROL,
        session="s",
        group="g",
        participant="p1",
        connection=connection.id,
        channel=Channel.HELLO,
        payload=payload | {"last_seq": last_seq},
    )
    hub.on_message(SimpleNamespace(type=None, body=envelope.encode()))  # type: ignore[arg-type]


async def send(participants: Participants, connection: Connection, seq: int) -> None:
    frame = InboundFrame(channel="decisions", seq=seq, payload=0.25)
    await participants._accept(connection, frame)


def sent(socket: Socket, channel: str) -> list[Any]:
    return [frame["payload"] for frame in socket.sent if frame["channel"] == channel]


async def test_a_hello_behind_an_ack_on_its_connection_says_the_acked_seq(gateway: Any) -> None:
    participants, hub, bus, connection, socket = gateway
    hello(hub, connection, 0)  # the first hello: nothing sent yet
    await send(participants, connection, 1)
    await send(participants, connection, 2)
    assert sent(socket, "ack") == [{"seq": 1}, {"seq": 2}]
    # A resync's hello from where the presence stood: after frame 1, before frame 2.
    hello(hub, connection, 1)
    resync = sent(socket, "hello")[-1]
    assert resync["last_seq"] == 2
    assert resync["group_decisions"] == {"p1": 0.5}  # the snapshot itself as decisions made it
    assert [e.seq for e in bus.inputs] == [1, 2]


async def test_a_hello_ahead_of_the_acks_is_delivered_as_it_is(gateway: Any) -> None:
    participants, hub, bus, connection, socket = gateway
    hello(hub, connection, 0)
    await send(participants, connection, 1)
    # Decisions knows more (frames of an earlier connection it applied since): it says so.
    hello(hub, connection, 5)
    assert sent(socket, "hello")[-1]["last_seq"] == 5
    await send(participants, connection, 4)  # at or below last_seq: a duplicate, acked again
    assert sent(socket, "ack")[-1] == {"seq": 4}
    assert [e.seq for e in bus.inputs] == [1]
