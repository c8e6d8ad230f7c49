"""A bad message never kills a consumer, and a dead consumer makes /readyz fail.

The gateway's hub (services/gateway/handlers.py) fed messages whose handling raises: it logs,
counts and goes on. `VitalTasks` (services/common/health.py), which every service's readiness
reads: a consumer or heartbeat task that ended turns /readyz to 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.common.directory import ParticipantInfo
from services.common.health import VitalTasks, health_router
from services.common.messages import Envelope, MessageType
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics
from tests.unit.test_gateway_connection import Socket


class BrokenSocket(Socket):
    """A socket object whose send fails at once, before any write starts: stands for any
    bug on the way to one browser."""

    def send_text(self, text: str) -> Any:
        raise RuntimeError("this socket object is broken")


class BusMessage:
    """What the hub reads of an aio-pika message: one envelope, or raw bytes."""

    type = None

    def __init__(self, body: Envelope | bytes) -> None:
        self.body = body.encode() if isinstance(body, Envelope) else body


def member(hub: Hub, code: str, socket: Socket) -> Connection:
    info = ParticipantInfo(participant=code, session="s", group="g", id_in_group=1, experiment="d")
    connection = Connection(socket, info, 100)  # type: ignore[arg-type]
    hub.add(connection)
    return connection


def broadcast(value: Any) -> BusMessage:
    envelope = Envelope(
        type=MessageType.BROADCAST, session="s", group="g", channel="group_decisions", payload=value
    )
    return BusMessage(envelope)


def failures(metrics: GatewayMetrics) -> float | None:
    return metrics.registry.get_sample_value("canopy_gateway_bus_failures_total")


def payloads(socket: Socket) -> list[Any]:
    return [orjson.loads(frame)["payload"] for frame in socket.sent]


async def test_a_delivery_that_raises_costs_one_member_one_frame_not_the_consumer() -> None:
    metrics = GatewayMetrics()
    hub = Hub(metrics)
    good, bad = Socket(), BrokenSocket()
    member(hub, "a", good)
    broken = member(hub, "b", bad)
    hub.on_message(broadcast({"n": 1}))  # type: ignore[arg-type]  # raised before the fix
    hub.on_message(broadcast({"n": 2}))  # type: ignore[arg-type]
    assert payloads(good) == [{"n": 1}, {"n": 2}]
    assert broken.closing  # asked to reconnect and resynchronise from hello
    assert failures(metrics) == 1  # closing: the second broadcast skips it


async def test_a_malformed_envelope_is_dropped_and_the_next_one_delivered() -> None:
    metrics = GatewayMetrics()
    hub = Hub(metrics)
    socket = Socket()
    connection = member(hub, "a", socket)
    hello = Envelope(
        type=MessageType.CONTROL,
        session="s",
        group="g",
        participant="a",
        connection=connection.id,
        channel="hello",
        payload={"last_seq": "not a number"},
    )
    hub.on_message(BusMessage(hello))  # type: ignore[arg-type]  # raised before the fix
    hub.on_message(BusMessage(b"{not json"))  # type: ignore[arg-type]
    hub.on_message(broadcast({"n": 1}))  # type: ignore[arg-type]
    assert payloads(socket) == [{"n": 1}]
    assert failures(metrics) == 2


class Queue:
    """A gateway queue that delivers the given messages, then ends."""

    def __init__(self, messages: list[BusMessage]) -> None:
        self.messages = messages

    def iterator(self, no_ack: bool = False) -> Queue:
        return self

    async def __aenter__(self) -> AsyncIterator[BusMessage]:
        async def deliver() -> AsyncIterator[BusMessage]:
            for message in self.messages:
                yield message

        return deliver()

    async def __aexit__(self, *exc: object) -> None:
        pass


async def test_the_consume_loop_goes_on_after_a_bad_message() -> None:
    hub = Hub(GatewayMetrics())
    socket = Socket()
    member(hub, "a", BrokenSocket())
    member(hub, "b", socket)
    queue = Queue([broadcast({"n": 1}), broadcast({"n": 2})])
    await asyncio.wait_for(hub.consume(queue), 5)  # type: ignore[arg-type]
    assert payloads(socket) == [{"n": 1}, {"n": 2}]


class Channel:
    """Records the acks written on it (aiormq's `basic_ack`)."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.acks.append((delivery_tag, multiple))


async def test_the_gateway_acknowledges_its_queue_every_so_many_messages() -> None:
    # Before: one ack per message (~1 per decision for the gateway to write and RabbitMQ to
    # apply); the prefetch still bounds what the broker sends ahead.
    hub = Hub(GatewayMetrics())
    socket = Socket()
    member(hub, "a", socket)
    channel = Channel()
    messages = []
    for tag in range(1, 11):
        message = broadcast({"n": tag})
        message.channel = channel  # type: ignore[attr-defined]
        message.delivery_tag = tag  # type: ignore[attr-defined]
        messages.append(message)
    await asyncio.wait_for(hub.consume(Queue(messages), ack_every=4), 5)  # type: ignore[arg-type]
    assert len(payloads(socket)) == 10
    assert channel.acks == [(4, True), (8, True)]


# -- a dead consumer makes /readyz fail --------------------------------------------------------


async def test_a_task_that_ended_is_a_readiness_problem(caplog: pytest.LogCaptureFixture) -> None:
    vital = VitalTasks()
    release = asyncio.Event()

    async def consumer() -> None:
        await release.wait()
        raise RuntimeError("boom")

    async def loop_that_returns() -> None:
        await release.wait()

    async def forever() -> None:
        await asyncio.Event().wait()

    dies = vital.watch("the consumer", asyncio.create_task(consumer()))
    returns = vital.watch("the heartbeat", asyncio.create_task(loop_that_returns()))
    handed_over = vital.watch("the consumer of shard 1", asyncio.create_task(consumer()))
    lives = vital.watch("the writer", asyncio.create_task(forever()))
    assert vital.problems() == []
    vital.forget("the consumer of shard 1")  # stopped on purpose
    release.set()
    await asyncio.gather(dies, returns, handed_over, return_exceptions=True)
    assert vital.problems() == ["the consumer stopped", "the heartbeat stopped"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        "the consumer stopped",
        "the heartbeat stopped (its loop ended)",
    ]
    assert errors[0].exc_info is not None
    lives.cancel()


async def test_readyz_answers_503_once_a_vital_task_died() -> None:
    vital = VitalTasks()
    crash = asyncio.Event()

    async def consumer() -> None:
        await crash.wait()
        raise RuntimeError("boom")

    async def readiness() -> list[str]:
        return vital.problems()

    app = FastAPI()
    app.include_router(health_router(CollectorRegistry(), readiness))
    task = vital.watch("the gateway queue's consumer", asyncio.create_task(consumer()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/readyz")).status_code == 200
        crash.set()
        await asyncio.gather(task, return_exceptions=True)
        answer = await client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["problems"] == ["the gateway queue's consumer stopped"]
