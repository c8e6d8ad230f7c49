"""An input whose outputs fail is handled again from the log, never lost from it.

Before: the group's state had applied the input when its log batch failed; the input went back
to its queue, came again, was a duplicate (`seen`) for that state, and its `in` row never
reached the log, although the gateway had acknowledged it. Now the worker drops the group's
state when an input's outputs fail, and the input, when it comes again, is applied to a state
rebuilt from the log (after a barrier), so it is logged once.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

import pytest

from services.common.bus import LOG, Bus
from services.common.directory import Directory
from services.common.messages import Envelope, LogBatch, now
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeDirectory, FakeStore, MemoryBus
from tests.unit.test_decisions_eviction import CONFIG, frame, presence, tick


class FlakyLogBus(MemoryBus):
    """The first log batch holding a frame's `in` row fails (as a publish that cannot go)."""

    def __init__(self, store: FakeStore) -> None:
        super().__init__(store)
        self.failed = 0

    async def publish_reliably(
        self, exchange: str, key: str, message: Any, *, mandatory: bool = True
    ) -> None:
        if (
            exchange == LOG
            and isinstance(message, LogBatch)
            and not self.failed
            and any(r.direction == "in" for r in message.records)
        ):
            self.failed += 1
            raise RuntimeError("the broker refused the batch")
        await super().publish_reliably(exchange, key, message, mandatory=mandatory)


async def test_an_input_whose_log_batch_failed_is_logged_when_it_comes_again() -> None:
    store = FakeStore()
    bus = FlakyLogBus(store)
    directory = FakeDirectory(store, CONFIG)
    log_writer = LogWriter(cast(Bus, bus), interval=0.01, max_records=100)
    worker = DecisionsWorker(
        cast(Bus, bus), cast(Directory, directory), DecisionsMetrics(), log_writer
    )

    async def handle(envelope: Envelope) -> None:
        confirmed: Awaitable[None] = await worker.handle(envelope)
        await confirmed

    try:
        starts_at = now()
        for envelope in (
            presence("a", "ca", connected=True),
            presence("b", "cb", connected=True),
            tick("period_start", starts_at),
        ):
            await handle(envelope)
        first = frame("a", "ca", 1, 0.3)
        with pytest.raises(RuntimeError):
            await handle(first)  # acknowledged by the gateway; its log batch failed
        await handle(first)  # the broker delivers it again
        await handle(frame("a", "ca", 2, 0.6))
        inbound = [(r["participant"], r["seq"]) for r in store.rows if r["direction"] == "in"]
        assert inbound == [("a", 1), ("a", 2)]
        assert worker.groups["g"].decisions["a"] == 0.6
        assert worker.groups["g"].last_seq["a"] == 2
    finally:
        await worker.close()
        await log_writer.close()
