"""How the store's event writer cuts its batches (`Gathering`, as decisions' log writer does):
a batch is written once it holds `batch_size` records, else `batch_seconds` after its first
message arrived, and what arrives during a write goes in the next one (fakes for MongoDB and
the broker's messages: tests/unit/test_store_writer.py's)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from tests.unit.test_store_writer import Channel, Message, _Queue, batch

TIMEOUT = 5.0


class HeldRepository:
    """Records each insert; holds it until the test releases it when `hold` is set."""

    def __init__(self, *, hold: bool = False) -> None:
        self.inserts: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def insert_events(self, documents: list[dict[str, Any]]) -> int:
        self.inserts.append([d["_id"] for d in documents])
        self.started.set()
        await self.release.wait()
        return len(documents)

    async def apply_status(self, updates: Any) -> None:
        list(updates)

    async def record_barriers(self, barriers: list[str]) -> None:
        pass


def writer(repository: HeldRepository, *, batch_size: int, batch_seconds: float) -> EventWriter:
    return EventWriter(
        repository,  # type: ignore[arg-type]
        StoreMetrics(),
        batch_size=batch_size,
        batch_seconds=batch_seconds,
    )


async def test_a_full_batch_is_written_at_once_without_waiting_for_its_time() -> None:
    repository = HeldRepository()
    events = writer(repository, batch_size=3, batch_seconds=3600)
    task = asyncio.create_task(events.run(_Queue()))  # type: ignore[arg-type]
    channel = Channel()
    messages = [Message(batch("a", "b"), 1, channel), Message(batch("c"), 2, channel)]
    for message in messages:
        await events.on_message(message)  # type: ignore[arg-type]
    await asyncio.wait_for(messages[-1].acked.wait(), TIMEOUT)  # not an hour later
    task.cancel()
    assert repository.inserts == [["a", "b", "c"]]


async def test_a_batch_not_full_is_written_batch_seconds_after_its_first_message() -> None:
    repository = HeldRepository()
    events = writer(repository, batch_size=100, batch_seconds=0.2)
    task = asyncio.create_task(events.run(_Queue()))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    message = Message(batch("a"), 1, Channel())
    arrived = loop.time()
    await events.on_message(message)  # type: ignore[arg-type]
    assert events.lag() >= 0.0 and repository.inserts == []
    await asyncio.wait_for(message.acked.wait(), TIMEOUT)
    task.cancel()
    assert loop.time() - arrived >= 0.2  # its batch's time counts from its first message
    assert repository.inserts == [["a"]]


async def test_what_arrives_during_a_write_is_written_after_it_in_one_batch() -> None:
    repository = HeldRepository(hold=True)
    events = writer(repository, batch_size=1, batch_seconds=3600)
    task = asyncio.create_task(events.run(_Queue()))  # type: ignore[arg-type]
    channel = Channel()
    first = Message(batch("a"), 1, channel)
    await events.on_message(first)  # type: ignore[arg-type]
    await asyncio.wait_for(repository.started.wait(), TIMEOUT)  # being written, held
    later = [Message(batch("b"), 2, channel), Message(batch("c"), 3, channel)]
    for message in later:
        await events.on_message(message)  # type: ignore[arg-type]
    assert events.lag() > 0.0  # the held write's events and the gathered ones are waiting
    repository.release.set()
    await asyncio.wait_for(later[-1].acked.wait(), TIMEOUT)
    task.cancel()
    assert repository.inserts == [["a"], ["b", "c"]]
    assert first.acks == [True] and later[0].acks == [] and later[1].acks == [True]
    assert events.lag() == 0.0
