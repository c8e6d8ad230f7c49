"""Timers' schedules are computed tick by tick: the same ticks as ever, in O(1) memory.

`reference_schedule` is the schedule as it was built before (every tick in one list); the
property test holds the lazy `domain.schedule` to it. The memory tests walk and resume a
100,000-sub-period schedule under tracemalloc, the resume through the worker's own
`ResumePeriod` handler with a fake bus and repository (no broker needed for a bound on memory).
"""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from services.common.bus import Bus
from services.common.messages import Envelope, MessageType, now
from services.timers.domain import Tick, schedule
from services.timers.handlers import TimersWorker
from services.timers.metrics import TimersMetrics
from services.timers.repository import TimersRepository
from tests.hostile.conftest import fuzz

SUBPERIODS = 100_000
MEMORY_BOUND = 1_000_000  # bytes: far below one Tick per sub-period (tens of MB)


def reference_schedule(
    period: int, starts_at: float, length: float, num_subperiods: int
) -> list[Tick]:
    """The schedule as timers built it before ticks were lazy: the contract to keep."""
    ends_at = starts_at + length
    ticks = [Tick(starts_at, "period_start", period, 0, starts_at, ends_at)]
    for k in range(1, num_subperiods + 1):
        at = ends_at if k == num_subperiods else starts_at + k * length / num_subperiods
        ticks.append(Tick(at, "subperiod", period, k, starts_at, ends_at))
    ticks.append(Tick(ends_at, "period_end", period, 0, starts_at, ends_at))
    return ticks


@fuzz(200)
@given(
    period=st.integers(min_value=1, max_value=1_000),
    starts_at=st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
    length=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    num_subperiods=st.integers(min_value=0, max_value=60),
    fired=st.integers(min_value=0, max_value=70),
)
def test_lazy_ticks_are_the_ticks_of_before(
    period: int, starts_at: float, length: float, num_subperiods: int, fired: int
) -> None:
    expected = reference_schedule(period, starts_at, length, num_subperiods)
    lazy = schedule(period, starts_at, length, num_subperiods)
    assert len(lazy) == len(expected)
    assert list(lazy) == expected
    assert [lazy[k] for k in range(-len(expected), len(expected))] == expected * 2
    # Resuming at `fired` gives exactly the rest of the old list, at the old positions.
    assert list(lazy.ticks(fired)) == list(enumerate(expected))[fired:]


def test_walking_a_huge_schedule_holds_one_tick_at_a_time() -> None:
    tracemalloc.start()
    try:
        ticks = schedule(1, 1_000.0, 3_600.0, SUBPERIODS)
        first = [ticks[k] for k in range(3)]
        last = [ticks[k] for k in range(len(ticks) - 3, len(ticks))]
        rest = list(ticks[SUBPERIODS - 9 :])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ticks) == SUBPERIODS + 2
    assert [(t.event, t.index, t.at) for t in first] == [
        ("period_start", 0, 1_000.0),
        ("subperiod", 1, 1_000.0 + 3_600.0 / SUBPERIODS),
        ("subperiod", 2, 1_000.0 + 2 * 3_600.0 / SUBPERIODS),
    ]
    assert [(t.event, t.index, t.at) for t in last] == [
        ("subperiod", SUBPERIODS - 1, 1_000.0 + (SUBPERIODS - 1) * 3_600.0 / SUBPERIODS),
        ("subperiod", SUBPERIODS, 4_600.0),
        ("period_end", 0, 4_600.0),
    ]
    assert rest[-3:] == last and len(rest) == 11
    assert peak < MEMORY_BOUND, f"walking the schedule peaked at {peak} bytes"


@dataclass
class FakeTopology:
    shards: int = 4


class FakeBus:
    """Publishes nowhere: keeps the ticks' payloads, confirmed at once."""

    def __init__(self) -> None:
        self.topology = FakeTopology()
        self.published: list[dict[str, Any]] = []

    async def publish(self, exchange: str, key: str, envelope: Envelope) -> None:
        # As the bus carries it: JSON (the timers build a `TimerFired`).
        self.published.append(Envelope.decode(envelope.encode()).payload)


class FakeCollection:
    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self._documents = documents

    async def find_one(self, query: dict[str, Any]) -> dict[str, Any] | None:
        document = self._documents.get(query["_id"])
        return dict(document) if document is not None else None


class FakeRepository:
    """The schedule documents in a dict; `done` is set once the last tick is recorded."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.documents = {document["_id"]: document}
        self.schedules = FakeCollection(self.documents)
        self.done = asyncio.Event()

    async def resume(self, schedule_id: str, *, starts_at: float, fired: int) -> dict[str, Any]:
        document = self.documents[schedule_id]
        document.update(paused=False, starts_at=starts_at, fired=fired, done=False)
        return dict(document)

    async def record_fired(self, schedule_id: str, fired: int, *, done: bool) -> None:
        document = self.documents[schedule_id]
        if document["fired"] < fired:
            document.update(fired=fired, done=done)
        if done:
            self.done.set()


async def test_resuming_a_huge_schedule_near_its_end_takes_no_memory_for_the_rest() -> None:
    length = 3_600.0
    document = {
        "_id": "g1:1",
        "session": "s1",
        "group": "g1",
        "period": 1,
        "starts_at": now() - 2 * length,
        "length": length,
        "num_subperiods": SUBPERIODS,
        "fired": 5,
        "done": False,
        "paused": True,
    }
    repository = FakeRepository(document)
    bus = FakeBus()
    worker = TimersWorker(
        cast(Bus, bus), cast(TimersRepository, repository), TimersMetrics(), owner="test"
    )
    ends_at = now() - 1.0  # the rest of the period is overdue: every tick goes out at once
    resume = Envelope(
        type=MessageType.RESUME_PERIOD,
        session="s1",
        group="g1",
        payload={"period": 1, "ends_at": ends_at, "next_tick": SUBPERIODS - 10},
    )
    tracemalloc.start()
    try:
        await worker.handle(resume)
        await asyncio.wait_for(repository.done.wait(), 10.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await worker.close()
    starts_at = ends_at - length
    assert [(p["event"], p["index"]) for p in bus.published] == [
        *(("subperiod", k) for k in range(SUBPERIODS - 10, SUBPERIODS + 1)),
        ("period_end", 0),
    ]
    assert bus.published[0]["starts_at"] == starts_at
    assert all(p["ends_at"] == starts_at + length for p in bus.published)
    assert all(p.get("late") for p in bus.published)  # overdue ticks are marked so
    assert repository.documents["g1:1"]["fired"] == SUBPERIODS + 2
    assert peak < MEMORY_BOUND, f"resuming the schedule peaked at {peak} bytes"
