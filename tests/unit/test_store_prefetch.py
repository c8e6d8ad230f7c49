"""The store's byte budget (issue 23, "Backpressure"): its prefetch is bounded by bytes
(`StoreSettings.store_prefetch`: CANOPY_STORE_BUFFER_BYTES over the largest log message), and
since that may be far fewer messages than a batch's records, a batch holding half the
prefetch is written at once rather than waiting for its time while nothing more can come.
The broker's side: tests/integration/test_store_budget.py."""

from __future__ import annotations

import asyncio

import pytest

from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from services.store.settings import MAX_ROW_BYTES, MESSAGE_OVERHEAD, StoreSettings
from tests.unit.test_store_batches import HeldRepository
from tests.unit.test_store_writer import Channel, Message, _Queue, batch

TOKEN = "t" * 20


@pytest.mark.parametrize(
    ("budget", "largest"),
    [
        (128 * 2**20, 4 * 2**20),  # the defaults: 31 messages
        (2**20, 4 * 2**20),  # a budget below one message: still 2 (one written, one coming)
        (64 * 2**20, 65_536),  # small messages: rows of up to 256 KiB still go alone
        (2**34, 65_536),  # a huge budget: two batches' worth of messages, as before
    ],
)
def test_the_prefetch_is_bounded_by_bytes(budget: int, largest: int) -> None:
    settings = StoreSettings(admin_token=TOKEN, store_buffer_bytes=budget, log_batch_bytes=largest)
    prefetch = settings.store_prefetch()
    message = max(largest, MAX_ROW_BYTES) + MESSAGE_OVERHEAD
    assert 2 <= prefetch <= 2 * settings.store_batch_size
    assert prefetch == 2 or prefetch * message <= budget


def test_the_default_prefetch_holds_at_most_the_default_budget() -> None:
    settings = StoreSettings(admin_token=TOKEN)
    assert settings.store_prefetch() * settings.log_batch_bytes <= settings.store_buffer_bytes
    assert settings.store_buffer_bytes == 128 * 2**20  # docs/reliability.md says so


async def test_a_batch_holding_half_the_prefetch_is_written_at_once() -> None:
    repository = HeldRepository()
    writer = EventWriter(
        repository,  # type: ignore[arg-type]
        StoreMetrics(),
        batch_size=2000,
        batch_seconds=3600,
        prefetch=4,
    )
    task = asyncio.create_task(writer.run(_Queue()))  # type: ignore[arg-type]
    channel = Channel()
    messages = [Message(batch("a"), 1, channel), Message(batch("b"), 2, channel)]
    for message in messages:
        await writer.on_message(message)  # type: ignore[arg-type]
    await asyncio.wait_for(messages[-1].acked.wait(), 5)  # not an hour later
    task.cancel()
    assert repository.inserts == [["a", "b"]]
