"""No queue whose consumer can only fail transiently dead-letters after N deliveries (issue 23).

A worker in a crash loop takes its prefetch of messages, dies before acking them, and the
broker counts a delivery for each every time; a handler that fails nacks them, which counts
too. With `x-delivery-limit` 50 on the shard, store and timers queues, the 51st sent the
in-flight inputs of every group on its shards (frames already acknowledged to participants),
log batches or period commands to `canopy.dead`. Here a consumer fails 60 times on the first
of two messages in each queue, dying or nacking in turn, against a real RabbitMQ node (a vhost
of its own): every message is still in its queue afterwards, and still first.

A broker that kept queues declared by an older Canopy (with the limit) must still serve: the
topology keeps such a queue as it is (RabbitMQ refuses a redeclaration with other arguments)
and says so in its log, with how to recreate it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.common import FieldTable

from services.common.bus import DEAD, STORE_QUEUE, TIMERS_QUEUE, Topology, shard_queue

pytestmark = [pytest.mark.integration]

CRASHES = 60  # more than the old limit of 50
TIMEOUT = 5.0


async def take(channel: AbstractChannel, name: str) -> AbstractIncomingMessage:
    """The next message of a queue, as a consumer gets it (basic.get does not work on a
    single-active-consumer quorum queue), left unacknowledged."""
    delivered: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if not delivered.done():
            delivered.set_result(message)

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(on_message)
    return await asyncio.wait_for(delivered, TIMEOUT)


@pytest.fixture
async def vhost_url(infra_handle: Any) -> AsyncIterator[str]:
    name = f"test-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", name)
    user = infra_handle.broker_user
    infra_handle.rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    yield infra_handle.infra.amqp_url.rstrip("/") + "/" + name
    infra_handle.rabbitmqctl("delete_vhost", name)


async def test_a_consumer_dying_sixty_times_dead_letters_nothing(vhost_url: str) -> None:
    queues = [shard_queue(0), shard_queue(1), STORE_QUEUE, TIMERS_QUEUE]
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        await Topology(2, "quorum").declare(channel)
        for name in queues:
            for n in (1, 2):  # two, so that the test sees their order too
                await channel.default_exchange.publish(
                    aio_pika.Message(f"{name} {n}".encode()), routing_key=name
                )
        for crash in range(1, CRASHES + 1):
            # A consumer that takes the message, then nacks it (a handler failed) or dies
            # before its ack (its channel closes).
            doomed = await connection.channel()
            await doomed.set_qos(prefetch_count=1)
            for name in queues:
                try:
                    taken = await take(doomed, name)
                except TimeoutError:
                    dead = await doomed.declare_queue(DEAD, passive=True)
                    raise AssertionError(
                        f"{name} lost its message after {crash - 1} crashes "
                        f"({dead.declaration_result.message_count} in {DEAD})"
                    ) from None
                # Still first: a message returned to a quorum queue without a delivery limit
                # goes to the back (RabbitMQ 3.10-3.13), which would break a group's order.
                assert taken.body == f"{name} 1".encode(), f"{name} reordered at crash {crash}"
                if crash % 2:
                    await taken.nack(requeue=True)
            await doomed.close()

        survivor = await connection.channel()
        await survivor.set_qos(prefetch_count=1)
        for name in queues:
            try:
                message = await take(survivor, name)
            except TimeoutError:
                raise AssertionError(f"{name} lost its message after {CRASHES} crashes") from None
            assert message.body == f"{name} 1".encode()
            delivered = (message.headers or {}).get("x-delivery-count", 0)
            assert isinstance(delivered, int) and delivered >= CRASHES
            await message.ack()
        dead = await survivor.declare_queue(DEAD, passive=True)
        assert dead.declaration_result.message_count == 0


async def test_queues_an_older_canopy_declared_with_a_limit_still_serve(
    vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        # What Canopy before this change declared.
        legacy: FieldTable = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD,
            "x-delivery-limit": 50,
        }
        await channel.declare_queue(
            shard_queue(0), durable=True, arguments=legacy | {"x-single-active-consumer": True}
        )
        await channel.declare_queue(STORE_QUEUE, durable=True, arguments=legacy)
        with caplog.at_level(logging.WARNING, logger="services.common.bus"):
            exchanges = await Topology(1, "quorum").declare(channel)
        assert not channel.is_closed
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert shard_queue(0) in warned and STORE_QUEUE in warned
        assert TIMERS_QUEUE not in warned  # declared afresh, with today's limit
        # The kept queue is routed to as before.
        await exchanges["canopy.log"].publish(aio_pika.Message(b"{}"), routing_key="log")
        queue = await channel.declare_queue(STORE_QUEUE, passive=True)
        assert queue.declaration_result.message_count == 1
