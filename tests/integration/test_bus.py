"""The bus against a real RabbitMQ node: topology, confirms + mandatory, batches (group
commit), ordered consumers, dead-lettering, single active consumer. Each test gets a vhost of its
own, so the stack that other tests run on the same node never sees these messages."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError, PublishError

from services.common.bus import (
    DEAD,
    DEFAULT,
    INPUTS,
    LOG,
    LOG_KEY,
    STORE_QUEUE,
    Batcher,
    Bus,
    Topology,
    consume_in_order,
    consume_pipelined,
    gateway_queue,
    input_key,
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
    user = infra_handle.broker_user
    infra_handle.rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
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
        await bus.publish(DEFAULT, gateway_queue("gone"), control)
    # Frames out are published without `mandatory`: the gateway may have gone away.
    await bus.publish(DEFAULT, gateway_queue("gone"), control, mandatory=False)


async def test_a_nacked_publish_gets_the_bus_a_new_channel(bus: Bus) -> None:
    """After a broker nack the bus publishes on a fresh channel (see `Bus._replace_channel`):
    here a full queue that rejects publishes nacks the second message."""
    channel = await bus.channel(prefetch=1)
    full = await channel.declare_queue(
        f"full-{secrets.token_hex(3)}",
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await full.bind(INPUTS, routing_key="test.full")
    await bus.publish(INPUTS, "test.full", frame("g9", 1))
    with pytest.raises(DeliveryError) as nacked:
        await bus.publish(INPUTS, "test.full", frame("g9", 2))
    assert not isinstance(nacked.value, PublishError)  # a nack, not a return
    await asyncio.wait_for(bus.channel_replaced(), 10)
    assert bus.channel_replacements == 1
    await full.purge()
    await bus.publish(INPUTS, "test.full", frame("g9", 3))  # the new channel works
    assert bus.is_connected
    # An unroutable message is the caller's error, not the channel's: no replacement.
    with pytest.raises(PublishError):
        await bus.publish(DEFAULT, gateway_queue("gone"), frame("g9", 4))
    await bus.channel_replaced()
    assert bus.channel_replacements == 1


async def test_a_publish_channel_left_closed_is_replaced(bus: Bus) -> None:
    """A publish channel closed on a live connection (a robust restore that lost a race with
    the reconnect) fails one publish, and the next goes out on a new channel."""
    old = bus._publish_channel
    assert old is not None
    await old.close()
    assert not bus.is_connected  # readiness says so until the channel is back
    with pytest.raises(ChannelInvalidStateError):
        await bus.publish(INPUTS, input_key("g10", SHARDS, "frame"), frame("g10", 1))
    await asyncio.wait_for(bus.channel_replaced(), 10)
    assert bus.channel_replacements == 1 and bus.is_connected
    await bus.publish(INPUTS, input_key("g10", SHARDS, "frame"), frame("g10", 2))


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


async def test_batcher_groups_what_arrives_while_a_batch_is_in_flight(bus: Bus) -> None:
    """The first envelope leaves alone; the ones added meanwhile share the next messages, in
    order, and a consumer sees every envelope once, in the order they were added."""
    group = "g4"
    sizes: list[int] = []
    batcher = Batcher(
        bus,
        INPUTS,
        input_key(group, SHARDS, "batch"),
        mandatory=True,
        reliable=False,
        max_items=40,
        on_batch=sizes.append,
    )
    first = batcher.add(frame(group, 1))
    await asyncio.sleep(0)  # the first batch is on its way
    rest = [batcher.add(frame(group, seq)) for seq in range(2, 101)]
    await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    assert batcher.idle
    assert sizes == [1, 40, 40, 19]  # max_items caps a message
    # A single envelope published the plain way is consumed alike, after the batches.
    await bus.publish(INPUTS, input_key(group, SHARDS, "timer"), frame(group, 101))

    seen: list[int] = []
    done = asyncio.Event()

    async def handler(envelope: Envelope) -> Any:
        seen.append(envelope.seq or 0)
        if envelope.seq == 101:
            done.set()
        return asyncio.sleep(0)

    channel = await bus.channel(prefetch=10)
    queue = await channel.declare_queue(shard_queue(shard_of(group, SHARDS)), passive=True)
    task = asyncio.create_task(consume_pipelined(queue, handler))
    await asyncio.wait_for(done.wait(), 10)
    assert seen == list(range(1, 102))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_batcher_fails_the_whole_batch_and_goes_on(bus: Bus) -> None:
    """An unroutable mandatory batch fails every envelope's future; later batches still go."""
    lost = Batcher(bus, DEFAULT, gateway_queue("gone"), mandatory=True, reliable=False)
    futures = [lost.add(frame("g5", seq)) for seq in (1, 2)]
    for future in futures:
        with pytest.raises(PublishError):
            await asyncio.wait_for(future, 10)
    assert lost.idle
    ok = Batcher(bus, INPUTS, input_key("g5", SHARDS, "batch"), mandatory=True, reliable=True)
    await asyncio.wait_for(ok.add(frame("g5", 3)), 10)
    await ok.close()


async def test_a_malformed_batch_is_dead_lettered_whole(bus: Bus) -> None:
    group = "g6"
    key = input_key(group, SHARDS, "batch")
    body = b"[" + frame(group, 1).encode() + b', {"type": "nonsense"}]'
    await bus.publish_raw(INPUTS, key, body, "bad-batch", message_type="canopy.batch")
    ok = Batcher(bus, INPUTS, key, mandatory=True, reliable=False)
    await asyncio.wait_for(ok.add(frame(group, 2)), 10)
    seen: list[int] = []
    malformed = asyncio.Event()
    handled = asyncio.Event()

    async def handler(envelope: Envelope) -> Any:
        seen.append(envelope.seq or 0)
        handled.set()
        return asyncio.sleep(0)

    channel = await bus.channel(prefetch=10)
    queue = await channel.declare_queue(shard_queue(shard_of(group, SHARDS)), passive=True)
    task = asyncio.create_task(
        consume_pipelined(queue, handler, on_malformed=lambda m, e: malformed.set())
    )
    await asyncio.wait_for(asyncio.gather(malformed.wait(), handled.wait()), 10)
    assert seen == [2]  # nothing of the malformed batch was applied
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
