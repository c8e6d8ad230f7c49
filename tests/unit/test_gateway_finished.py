"""A seat back after its end gets `hello` then `finished` again (PROTOCOL v2 "Online
studies"): decisions sends both as Control frames for that one connection, and the gateway's
`Hub` delivers both, in order (it used to pass on only `hello` and act on `replaced`)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from starlette.websockets import WebSocketState

from services.common.directory import ParticipantInfo
from services.common.messages import Channel, Envelope, MessageType
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics

INFO = ParticipantInfo(
    participant="p1", session="s", group="g", id_in_group=1, experiment="decisions"
)
FINISHED = {"outcome": "completed", "total_payoff": 3.5, "redirect": None, "code": "C-1"}


class Socket:
    def __init__(self) -> None:
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[dict[str, Any]] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def control(hub: Hub, connection_id: str, channel: str, payload: dict[str, Any]) -> None:
    envelope = Envelope(
        type=MessageType.CONTROL,
        session="s",
        group="g",
        participant="p1",
        connection=connection_id,
        channel=channel,
        payload=payload,
    )
    hub.on_message(SimpleNamespace(type=None, body=envelope.encode()))  # type: ignore[arg-type]


async def test_hello_then_finished_reach_the_connection_in_order() -> None:
    hub = Hub(GatewayMetrics())
    socket = Socket()
    connection = Connection(socket, INFO, 100)  # type: ignore[arg-type]
    hub.add(connection)
    control(hub, connection.id, Channel.HELLO, {"participant": "p1", "last_seq": 0})
    control(hub, connection.id, Channel.FINISHED, FINISHED)
    control(hub, "an-older-connection", Channel.FINISHED, FINISHED)  # not this one: dropped
    assert [frame["channel"] for frame in socket.sent] == ["hello", "finished"]
    assert socket.sent[1]["payload"] == FINISHED
