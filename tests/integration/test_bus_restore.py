"""The bus after its connection was closed from the broker side: not connected until every
channel is restored (issue 23, "Partitions": tests/cluster/test_partition.py).

aio-pika sets its `connected` event as soon as a new underlying connection is open, and then
restores the channels one at a time; a channel whose restore fails (here: its queue's binding
names an exchange that is gone) closes that connection, and the next attempt follows 0.5 s
later. Before, `Bus.is_connected` was true as soon as the publish channel was back, while a
consume channel was not: a gateway took participant sockets then and published their presence,
and the `hello` decisions sent back went to a queue that did not exist yet.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from services.common.bus import Bus, Topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def vhost_url(infra_handle: Any) -> AsyncIterator[str]:
    name = f"test-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", name)
    user = infra_handle.broker_user
    infra_handle.rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    yield infra_handle.infra.amqp_url.rstrip("/") + "/" + name
    infra_handle.rabbitmqctl("delete_vhost", name)


def close_connection(infra_handle: Any, name: str) -> None:
    """Close the client connection called `name` from the broker's side."""
    listed = infra_handle.rabbitmqctl("list_connections", "-q", "pid", "client_properties")
    pids = [line.split()[0] for line in listed.stdout.splitlines() if f'"{name}"' in line]
    assert len(pids) == 1, listed.stdout
    closed = infra_handle.rabbitmqctl("close_connection", pids[0], "test: restore")
    assert closed.returncode == 0, closed.stdout


async def test_not_connected_until_every_channel_is_restored(
    infra_handle: Any, vhost_url: str
) -> None:
    name = f"restore-{secrets.token_hex(3)}"
    reconnected = asyncio.Event()
    bus = Bus(vhost_url, Topology(1, "classic"), name=name, on_reconnect=reconnected.set)
    await bus.connect()
    admin = await aio_pika.connect(vhost_url)
    try:
        other = await admin.channel()
        exchange = f"test.restore.{secrets.token_hex(3)}"
        await other.declare_exchange(exchange, "fanout")
        # A consume channel as a gateway's: an exclusive queue, bound, with a consumer.
        channel = await bus.channel(prefetch=10)
        queue = await channel.declare_queue(f"{name}.own", exclusive=True, auto_delete=True)
        await queue.bind(exchange)

        async def take(message: AbstractIncomingMessage) -> None:
            await message.ack()

        await queue.consume(take)
        assert bus.is_connected

        # Each time the publish channel is back, whether the bus says it is connected.
        seen: list[bool] = []
        publish_back = asyncio.Event()

        def reopened(_: object) -> None:
            seen.append(bus.is_connected)
            publish_back.set()

        publish = bus._publish_channel
        assert isinstance(publish, aio_pika.RobustChannel)
        publish.reopen_callbacks.add(reopened)

        # The queue's binding cannot be restored while the exchange is gone: every attempt
        # opens a connection, restores the publish channel, fails on the queue and closes.
        await other.exchange_delete(exchange)
        await asyncio.to_thread(close_connection, infra_handle, name)
        await asyncio.wait_for(publish_back.wait(), 20)
        publish_back.clear()
        await asyncio.wait_for(publish_back.wait(), 20)  # a second attempt, failed as well
        assert not reconnected.is_set()
        assert seen and not any(seen), f"connected with a channel not restored: {seen}"
        assert not bus.is_connected

        await other.declare_exchange(exchange, "fanout")  # the next attempt restores it all
        await asyncio.wait_for(reconnected.wait(), 20)
        assert bus.is_connected
        vhost = vhost_url.rsplit("/", 1)[1]
        listed = await asyncio.to_thread(
            infra_handle.rabbitmqctl, "list_queues", "-q", "-p", vhost, "name", "consumers"
        )
        assert f"{queue.name}\t1" in listed.stdout.splitlines(), listed.stdout
    finally:
        await admin.close()
        await bus.close()
