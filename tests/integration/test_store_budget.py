"""What the store holds of the log is bounded in bytes (issue 23, "Backpressure"): with MongoDB
away, a backlog of large log messages waits in RabbitMQ, and the store has been sent at most
CANOPY_STORE_BUFFER_BYTES of it (`StoreSettings.store_prefetch`). Before, the prefetch was
2 x store_batch_size messages (4,000, each up to 1,000 records and 4 MiB): the broker sent the
store the whole backlog. A real node and the store's own writer and settings; MongoDB is a
fake that holds every insert until the test lets it go (a database that does not answer)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest

from services.common.messages import LogBatch, LogRecord
from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from services.store.settings import MESSAGE_OVERHEAD, StoreSettings
from tests.unit.test_store_batches import HeldRepository

pytestmark = [pytest.mark.integration]

MESSAGES, RECORDS, VALUE = 30, 100, "x" * 10_000  # about 1 MB per message
QUEUE = "budget-test"


@pytest.fixture
async def vhost_url(infra_handle: Any) -> AsyncIterator[str]:
    name = f"test-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", name)
    user = infra_handle.broker_user
    infra_handle.rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    yield infra_handle.infra.amqp_url.rstrip("/") + "/" + name
    infra_handle.rabbitmqctl("delete_vhost", name)


def log_message(index: int) -> bytes:
    records = [
        LogRecord(
            id=f"m{index}-r{n}",
            ts=1.0,
            session="s",
            group="g",
            participant="p",
            direction="in",
            channel="decisions",
            seq=index * RECORDS + n + 1,
            value=VALUE,
        )
        for n in range(RECORDS)
    ]
    return LogBatch(records=records).encode()


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Polls the broker's count (or the fake database) until `check` holds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def test_a_backlog_waits_in_rabbitmq_not_in_the_store(vhost_url: str) -> None:
    bodies = [log_message(i) for i in range(MESSAGES)]
    largest = max(len(b) for b in bodies)
    settings = StoreSettings(
        admin_token="t" * 20,
        log_batch_bytes=largest,  # decisions cuts its messages at about this size
        store_buffer_bytes=8 * 1024 * 1024,
    )
    prefetch = settings.store_prefetch()
    assert prefetch * (largest + MESSAGE_OVERHEAD) <= settings.store_buffer_bytes
    assert 2 <= prefetch < MESSAGES

    repository = HeldRepository(hold=True)  # MongoDB does not answer
    writer = EventWriter(
        repository,  # type: ignore[arg-type]
        StoreMetrics(),
        batch_size=settings.store_batch_size,
        batch_seconds=settings.store_batch_seconds,
        prefetch=prefetch,
    )
    connection = await aio_pika.connect(vhost_url)
    try:
        publisher = await connection.channel(publisher_confirms=True)
        await publisher.declare_queue(QUEUE, durable=True)
        for body in bodies:
            await publisher.default_exchange.publish(aio_pika.Message(body), routing_key=QUEUE)

        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)  # as the store's app sets it
        queue = await channel.declare_queue(QUEUE, passive=True)
        running = asyncio.create_task(writer.run(queue))
        try:
            await asyncio.wait_for(repository.started.wait(), 10)  # a write, held
            probe = await connection.channel()

            async def ready() -> int:
                declared = await probe.declare_queue(QUEUE, passive=True)
                return declared.declaration_result.message_count or 0

            # The broker has sent the store its prefetch, no more: the rest waits there.
            async def sent_the_prefetch() -> bool:
                return await ready() <= MESSAGES - prefetch

            await until(sent_the_prefetch, 10)
            assert await ready() == MESSAGES - prefetch, prefetch
            held = sum(len(i) for i in repository.inserts)
            assert held <= prefetch * RECORDS

            repository.release.set()  # MongoDB is back: the backlog flows through the bound

            async def all_written() -> bool:
                taken = sum(len(i) for i in repository.inserts)
                return taken >= MESSAGES * RECORDS and not await ready()

            await until(all_written, 30)
            written = [record for insert in repository.inserts for record in insert]
            assert len(set(written)) == MESSAGES * RECORDS
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    finally:
        await connection.close()
