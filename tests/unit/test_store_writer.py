"""The store's event writer against a database that fails for a while, and a broker channel
that closed under it (fakes: the real broker and MongoDB cases are in tests/faults)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.messages import LogBatch, LogRecord
from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics


class FlakyRepository:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.written: list[str] = []
        self.barriers: list[str] = []

    async def insert_events(self, documents: list[dict[str, Any]]) -> int:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("MongoDB is away")
        self.written.extend(d["_id"] for d in documents)
        return len(documents)

    async def apply_status(self, updates: Any) -> None:
        list(updates)

    async def record_barriers(self, barriers: list[str]) -> None:
        self.barriers.extend(barriers)


class Channel:
    def __init__(self, *, closed: bool = False) -> None:
        self.closed = closed


class Message:
    def __init__(self, batch: LogBatch, tag: int, channel: Channel) -> None:
        self.body = batch.encode()
        self.delivery_tag = tag
        self.channel = channel
        self.acks: list[bool] = []
        self.acked = asyncio.Event()
        self.nacks = 0

    async def ack(self, multiple: bool = False) -> None:
        if self.channel.closed:
            raise RuntimeError("channel closed")
        self.acks.append(multiple)
        self.acked.set()

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.nacks += 1

    async def reject(self, requeue: bool = False) -> None:
        raise AssertionError("nothing here is malformed")


def batch(*ids: str, barrier: str | None = None) -> LogBatch:
    records = [
        LogRecord(
            id=i,
            ts=1.0,
            session="s",
            group="g",
            participant="p",
            direction="in",
            channel="decisions",
            seq=n,
            value=0.5,
        )
        for n, i in enumerate(ids, start=1)
    ]
    return LogBatch(records=records, barrier=barrier)


async def test_a_failing_database_holds_the_batch_instead_of_requeueing_it() -> None:
    repository = FlakyRepository(failures=3)
    metrics = StoreMetrics()
    writer = EventWriter(repository, metrics, batch_size=100, batch_seconds=0.01)  # type: ignore[arg-type]
    channel = Channel()
    messages = [Message(batch("a", "b"), 1, channel), Message(batch("c", barrier="x"), 2, channel)]
    for message in messages:
        await writer.on_message(message)  # type: ignore[arg-type]
    queue = _Queue()
    task = asyncio.create_task(writer.run(queue))  # type: ignore[arg-type]
    await asyncio.wait_for(messages[-1].acked.wait(), 10)
    task.cancel()
    assert repository.attempts == 4
    assert repository.written == ["a", "b", "c"]
    assert repository.barriers == ["x"]  # recorded once its batch was written
    assert [m.nacks for m in messages] == [0, 0]  # never requeued: no delivery limit reached
    assert messages[-1].acks == [True] and messages[0].acks == []  # one ack, multiple
    assert metrics.registry.get_sample_value("canopy_store_batch_failures_total") == 3


async def test_messages_of_a_closed_channel_do_not_stop_the_writer() -> None:
    """After a broker reconnect a batch mixes the old channel's messages (not ackable) with
    the new one's, whose tags start again at 1: each is acked on its own channel."""
    repository = FlakyRepository(failures=0)
    writer = EventWriter(repository, StoreMetrics(), batch_size=100, batch_seconds=0.01)  # type: ignore[arg-type]
    old, new = Channel(closed=True), Channel()
    stale = Message(batch("a"), 7, old)
    fresh = [Message(batch("b"), 1, new), Message(batch("c"), 2, new)]
    for message in (stale, *fresh):
        await writer.on_message(message)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run(_Queue()))  # type: ignore[arg-type]
    await asyncio.wait_for(fresh[-1].acked.wait(), 10)
    # And it goes on writing what comes next.
    later = Message(batch("d"), 3, new)
    await writer.on_message(later)  # type: ignore[arg-type]
    await asyncio.wait_for(later.acked.wait(), 10)
    task.cancel()
    assert repository.written == ["a", "b", "c", "d"]
    assert fresh[0].acks == [] and fresh[1].acks == [True]


class _Queue:
    async def consume(self, callback: Any) -> None:
        pass
