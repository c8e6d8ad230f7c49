"""The bus against a real RabbitMQ node: topology, confirms + mandatory, ordered consumers,
dead-lettering, single active consumer. Each test gets a vhost of its own, so the stack that
other tests run on the same node never sees these messages."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import PublishError

from services.common.bus import (
    DEAD,
    INPUTS,
    LOG,
    LOG_KEY,
    OUTPUTS,
    STORE_QUEUE,
    Bus,
    Topology,
    consume_in_order,
    input_key,
    output_key,
    shard_of,
    shard_queue,
)
from services.common.messages import Envelope, LogBatch, MessageType, inbound_record

pytestmark = [pytest.mark.integration]

SHARDS = 2


@pytest.fixture
async def vhost_url(infra_handle: Any) -> AsyncIterator[str]:
    name = f"test-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", name)
    infra_handle.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield infra_handle.infra.amqp_url.rstrip("/") + "/" + name
    infra_handle.rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def bus(vhost_url: str) -> AsyncIterator[Bus]:
    bus = Bus(vhost_url, Topology(SHARDS, "quorum"), name="test")
    await bus.connect()
    yield bus
    await bus.close()


def frame(group: str, seq: int) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group=group,
        participant="p",
        seq=seq,
        channel="decisions",
        payload=seq,
    )


async def test_topology_routes_inputs_to_shards_and_log_batches_to_the_store(bus: Bus) -> None:
    await bus.topology.declare(await bus.channel(prefetch=1))  # a second declaration agrees
    channel = await bus.channel(prefetch=100)
    group = "g1"
    await bus.publish(INPUTS, input_key(group, SHARDS, "frame"), frame(group, 1))
    presence = Envelope(
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group=group,
        participant="p",
        connection="c",
        payload={"connected": True},
    )
    await bus.publish(INPUTS, input_key(group, SHARDS, "presence"), presence)
    await bus.publish(LOG, LOG_KEY, LogBatch(records=[inbound_record(frame(group, 1))]))
    shard = await channel.declare_queue(shard_queue(shard_of(group, SHARDS)), passive=True)
    store = await channel.declare_queue(STORE_QUEUE, passive=True)
    assert shard.declaration_result.message_count == 2
    assert store.declaration_result.message_count == 1  # the log batch, nothing else


async def test_unroutable_mandatory_publish_raises(bus: Bus) -> None:
    control = Envelope(
        type=MessageType.CONTROL,
        session="s",
        group="nobody-here",
        participant="p",
        connection="c",
        channel="hello",
        payload={},
    )
    with pytest.raises(PublishError):
        await bus.publish(OUTPUTS, output_key("nobody-here", logged=False), control)
    # Frames out are published without `mandatory`: no gateway may hold the group.
    await bus.publish(OUTPUTS, output_key("nobody-here", logged=True), control, mandatory=False)


async def test_consume_in_order_retries_failures_and_dead_letters_garbage(bus: Bus) -> None:
    group = "g2"
    seen: list[int] = []
    failed_once = asyncio.Event()
    done = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        assert envelope.seq is not None
        if envelope.seq == 5 and not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("transient")
        seen.append(envelope.seq)
        if envelope.seq == 50:
            done.set()

    for seq in range(1, 51):
        await bus.publish(INPUTS, input_key(group, SHARDS, "frame"), frame(group, seq))
    channel = await bus.channel(prefetch=1)
    await bus.publish_raw(INPUTS, input_key(group, SHARDS, "frame"), b"{not an envelope", "x")
    queue = await channel.declare_queue(shard_queue(shard_of(group, SHARDS)), passive=True)
    malformed: list[bytes] = []
    dead_lettered = asyncio.Event()

    def on_malformed(message: AbstractIncomingMessage, error: Exception) -> None:
        malformed.append(message.body)
        dead_lettered.set()

    task = asyncio.create_task(consume_in_order(queue, handler, on_malformed=on_malformed))
    await asyncio.wait_for(done.wait(), 10)
    # With prefetch 1 a requeued message is redelivered before the next one.
    assert seen == list(range(1, 51))
    dead = await channel.declare_queue(DEAD, passive=True)
    await asyncio.wait_for(dead_lettered.wait(), 10)
    # Quorum queues dead-letter asynchronously: wait for the message to arrive there.
    arrived: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_dead(message: AbstractIncomingMessage) -> None:
        await message.ack()
        if not arrived.done():
            arrived.set_result(message.body)

    await dead.consume(on_dead)
    assert await asyncio.wait_for(arrived, 10) == b"{not an envelope"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_single_active_consumer_owns_a_shard(bus: Bus, vhost_url: str) -> None:
    group = "g3"
    name = shard_queue(shard_of(group, SHARDS))
    received: dict[str, list[int]] = {"first": [], "second": []}
    all_in = asyncio.Event()
    connections = []
    for who in received:
        connection = await aio_pika.connect(vhost_url)
        connections.append(connection)
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)

        async def on_message(message: AbstractIncomingMessage, who: str = who) -> None:
            received[who].append(Envelope.decode(message.body).seq or 0)
            await message.ack()
            if len(received["first"]) + len(received["second"]) == 20:
                all_in.set()

        await queue.consume(on_message)
    for seq in range(1, 21):
        await bus.publish(INPUTS, input_key(group, SHARDS, "frame"), frame(group, seq))
    await asyncio.wait_for(all_in.wait(), 10)
    assert received["first"] == list(range(1, 21))
    assert received["second"] == []
    for connection in connections:
        await connection.close()
