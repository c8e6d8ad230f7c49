"""Poison records against the MongoDB-wire server: the store's event writer and Repository
on nx-27017 (the session's infra), fed a batch holding records no MongoDB can take.

Two sizes, because nx-27017 differs from real MongoDB: it stores a document over 16 MiB
(real MongoDB refuses it with write error 2), so the 17 MiB record shows that the store
enforces MongoDB's limit itself; a record over PyMongo's 48 MB wire message is refused by
PyMongo on any server (DocumentTooLarge), which made the writer retry that batch forever.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common.messages import LogBatch, LogRecord
from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from services.store.repository import Repository
from tests.unit.test_store_writer import Channel, Message, _Queue

pytestmark = [pytest.mark.integration]

MIB = 1024 * 1024


@pytest.fixture
async def repository(infra: Any) -> AsyncIterator[Repository]:
    repository = Repository(infra.mongo_url, f"poison_{secrets.token_hex(4)}")
    await repository.setup()
    yield repository
    await repository.close()


def record(n: int, value: Any) -> LogRecord:
    return LogRecord(
        id=f"out:{n}",
        ts=float(n),
        session="s",
        group="g",
        participant=None,
        direction="out",
        channel="book",
        seq=None,
        value=value,
    )


async def test_a_batch_with_oversize_records_is_written_without_them(
    repository: Repository,
) -> None:
    records = [
        record(1, {"bids": [[1, 1]]}),
        record(2, {"bids": ["x" * (17 * MIB)]}),  # over MongoDB's 16 MiB
        record(3, {"bids": [[2, 1]]}),
        record(4, {"bids": ["x" * (49 * 10**6)]}),  # over a wire message (48 MB)
        record(5, {"bids": [[3, 1]]}),
    ]
    metrics = StoreMetrics()
    writer = EventWriter(repository, metrics, batch_size=1000, batch_seconds=0.01)
    message = Message(LogBatch(records=records), 1, Channel())
    await writer.on_message(message)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run(_Queue()))  # type: ignore[arg-type]
    try:
        # Before the fix this never happened: the batch was retried forever.
        await asyncio.wait_for(message.acked.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    logged = [d["_id"] async for d in repository.session_events("s")]
    assert logged == ["out:1", "out:3", "out:5"]
    quarantine = {d["_id"]: d async for d in repository.quarantine.find({})}
    assert sorted(quarantine) == ["out:2", "out:4"]
    for document in quarantine.values():
        assert document["reason"] == "too_large"
        assert document["size"] > 16 * MIB
        assert (document["session"], document["group"], document["channel"]) == ("s", "g", "book")
        assert document["value"].startswith('{"bids":["xxx')
        assert len(document["value"]) == 64 * 1024 and document["value_truncated"] is True
    sample = metrics.registry.get_sample_value
    assert sample("canopy_store_quarantined_total", {"reason": "too_large"}) == 2
    assert sample("canopy_store_events_total", {"direction": "out"}) == 3
