"""The store's dead-letter keeper against a real RabbitMQ node (a vhost of its own) and the
session's nx-27017: messages that consumers really rejected reach `canopy.dead` with RabbitMQ's
own `x-death` headers, and the keeper keeps each once, with where it came from and why, counts
it, and redrives it to the queue it died in.

Before the keeper nothing read `canopy.dead`: a dead letter was silent loss."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from services.common.bus import (
    BATCH_TYPE,
    DEAD,
    INPUTS,
    Bus,
    Topology,
    consume_in_order,
    encode_batch,
    input_key,
    shard_queue,
)
from services.common.messages import Envelope, MessageType
from services.store.deadletters import REDRIVE_HEADER, DeadLetterKeeper

pytestmark = [pytest.mark.integration]

TIMEOUT = 10.0
GROUP = "g"


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
    bus = Bus(vhost_url, Topology(1, "quorum"), name="test")
    await bus.connect()
    yield bus
    await bus.close()


@pytest.fixture
async def keeper(bus: Bus, infra: Any) -> AsyncIterator[DeadLetterKeeper]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(infra.mongo_url)
    keeper = DeadLetterKeeper(
        client[f"dead_{secrets.token_hex(4)}"]["dead_letters"], bus, CollectorRegistry()
    )
    await keeper.setup()
    channel = await bus.channel(prefetch=16)
    task = asyncio.create_task(keeper.run(await channel.declare_queue(DEAD, passive=True)))
    yield keeper
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()


def frame(seq: int) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group=GROUP,
        participant="p",
        seq=seq,
        channel="decisions",
        payload=seq,
    )


async def kept(keeper: DeadLetterKeeper, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            found = await keeper.list(limit=100)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)  # dead-lettering and keeping happen on the broker's time


def counted(keeper: DeadLetterKeeper) -> dict[tuple[str, str], float]:
    """canopy_store_dead_letters_total by (queue, reason), the series that counted any (the
    keeper starts some at 0, so that the metric exists before the first dead letter)."""
    return {
        (sample.labels["queue"], sample.labels["reason"]): sample.value
        for metric in keeper.kept.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    }


async def reject_next(bus: Bus) -> AbstractIncomingMessage:
    """What an older decisions worker does with a message it cannot read: reject it."""
    channel = await bus.channel(prefetch=1)
    queue = await channel.declare_queue(shard_queue(0), passive=True)
    got: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.reject(requeue=False)
        if not got.done():
            got.set_result(message)

    await queue.consume(on_message)
    try:
        return await asyncio.wait_for(got, TIMEOUT)
    finally:
        await channel.close()


async def test_a_rejected_message_is_kept_counted_and_redriven_to_its_queue(
    bus: Bus, keeper: DeadLetterKeeper
) -> None:
    key = input_key(GROUP, 1, "batch")
    envelope = frame(1)
    await bus.publish_raw(INPUTS, key, encode_batch([envelope]), "m1", message_type=BATCH_TYPE)
    rejected = await reject_next(bus)

    (dead,) = await kept(keeper, 1)
    assert dead["state"] == "dead" and dead["redrives"] == 0
    assert (dead["queue"], dead["reason"]) == (shard_queue(0), "rejected")
    assert (dead["exchange"], dead["routing_key"]) == (INPUTS, key)
    assert (dead["message_id"], dead["type"]) == ("m1", BATCH_TYPE)
    assert dead["cause"] == "rejected by its consumer (it reads as valid here)"
    assert dead["count"] == 1 and dead["died_at"] > 0
    assert dead["headers"]["x-death"][0]["queue"] == shard_queue(0)
    assert dead["body"] == rejected.body.decode()
    assert counted(keeper) == {(shard_queue(0), "rejected"): 1}
    assert await keeper.summary() == {"total": 1, "dead": 1}

    # Redriven: the same message is back in the shard queue, where it first came from.
    redriven = await keeper.redrive(dead["id"])
    assert redriven is not None
    assert (redriven["state"], redriven["redrives"]) == ("redriven", 1)
    again = await reject_next(bus)
    assert again.body == rejected.body
    assert (again.message_id, again.type) == ("m1", BATCH_TYPE)
    assert (again.headers or {})[REDRIVE_HEADER] == f"{dead['id']}:1"

    # Rejected again: a second dead letter, not the first one again.
    second, first = await kept(keeper, 2)
    assert first["id"] == dead["id"] and first["state"] == "redriven"
    assert second["id"] != dead["id"] and second["state"] == "dead"
    assert await keeper.summary() == {"total": 2, "dead": 1}
    assert counted(keeper) == {(shard_queue(0), "rejected"): 2}
    assert await keeper.redrive("no such id") is None


async def test_garbage_and_a_newer_major_version_are_kept_with_their_cause(
    bus: Bus, keeper: DeadLetterKeeper
) -> None:
    """Through the real consumer loop (`consume_in_order`): it rejects both at once."""
    key = input_key(GROUP, 1, "batch")
    newer = frame(2).model_dump(mode="json") | {"version": 2}
    await bus.publish_raw(INPUTS, key, b"{not an envelope", "garbage", message_type=BATCH_TYPE)
    await bus.publish_raw(INPUTS, key, orjson.dumps([newer]), "newer", message_type=BATCH_TYPE)
    await bus.publish(INPUTS, key, frame(3))
    handled: list[int] = []
    done = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.seq or 0)
        done.set()

    channel = await bus.channel(prefetch=10)
    queue = await channel.declare_queue(shard_queue(0), passive=True)
    task = asyncio.create_task(consume_in_order(queue, handler))
    try:
        await asyncio.wait_for(done.wait(), TIMEOUT)
        letters = {d["message_id"]: d for d in await kept(keeper, 2)}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handled == [3]
    assert letters["garbage"]["cause"].startswith("malformed: ")
    assert letters["newer"]["cause"].startswith("version 2 is newer than this reader's (1)")
    assert {d["reason"] for d in letters.values()} == {"rejected"}


async def test_a_dead_letter_delivered_twice_is_kept_once(bus: Bus, infra: Any) -> None:
    """The store kept it, then its channel died before the ack: the broker delivers it again."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(infra.mongo_url)
    keeper = DeadLetterKeeper(
        client[f"dead_{secrets.token_hex(4)}"]["dead_letters"], bus, CollectorRegistry()
    )
    try:
        await bus.publish(INPUTS, input_key(GROUP, 1, "batch"), frame(1))
        await reject_next(bus)
        deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_dead(message: AbstractIncomingMessage) -> None:
            await deliveries.put(message)

        first_channel = await bus.channel(prefetch=1)
        await (await first_channel.declare_queue(DEAD, passive=True)).consume(on_dead)
        first = await asyncio.wait_for(deliveries.get(), TIMEOUT)
        await first_channel.close()  # the ack will be lost with it
        await keeper.keep(first)

        second_channel = await bus.channel(prefetch=1)
        await (await second_channel.declare_queue(DEAD, passive=True)).consume(on_dead)
        second = await asyncio.wait_for(deliveries.get(), TIMEOUT)
        assert second.redelivered and second.body == first.body
        await keeper.keep(second)
        await second_channel.close()

        assert await keeper.summary() == {"total": 1, "dead": 1}
        assert counted(keeper) == {(shard_queue(0), "rejected"): 1}
    finally:
        await client.close()
