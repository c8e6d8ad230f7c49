"""A `DecisionsWorker` drops the groups that are over, and only once the log holds them.

The worker runs on the in-memory bus with a fake store (tests/memory_bus.py): log batches the
worker publishes wait in the store's queue until the test lets the store write them, as a
lagging store would. A group whose last period ended and whose members left must stay in
memory until a log barrier shows its rows written, then go; an input for it afterwards rebuilds
it from those rows. The real store and broker play the same story in
tests/hostile/test_bounded_state.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.common.directory import GroupConfig
from services.common.messages import Channel, Envelope, MessageType, now
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeDirectory, FakeStore, MemoryBus

TIMEOUT = 5.0


CONFIG = GroupConfig(
    session="s",
    group="g",
    experiment="decisions",
    members=["a", "b"],
    num_periods=1,
    period_length=10.0,
    num_subperiods=0,
    rate_limit=0.0,
    params={},
)


def presence(participant: str, connection: str, *, connected: bool) -> Envelope:
    return Envelope(
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group="g",
        participant=participant,
        connection=connection,
        gateway="gw",
        payload={"connected": connected},
    )


def frame(participant: str, connection: str, seq: int, value: float) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group="g",
        participant=participant,
        seq=seq,
        channel="decisions",
        connection=connection,
        gateway="gw",
        payload=value,
    )


def tick(event: str, starts_at: float) -> Envelope:
    payload = {"event": event, "period": 1, "index": 0, "starts_at": starts_at}
    payload["ends_at"] = starts_at + CONFIG.period_length
    return Envelope(
        type=MessageType.TIMER_FIRED, session="s", group="g", channel=event, payload=payload
    )


async def test_an_ended_group_goes_once_logged_and_comes_back_from_the_log() -> None:
    store = FakeStore()
    bus = MemoryBus(store)
    directory = FakeDirectory(store, CONFIG)
    metrics = DecisionsMetrics()
    log_writer = LogWriter(bus, interval=0.01, max_records=100)
    worker = DecisionsWorker(bus, directory, metrics, log_writer, evict_after=0.05)

    async def handle(envelope: Envelope) -> None:
        confirmed: Awaitable[None] = await worker.handle(envelope)
        await confirmed

    try:
        starts_at = now()
        for envelope in (
            presence("a", "ca", connected=True),
            presence("b", "cb", connected=True),
            tick("period_start", starts_at),
            frame("a", "ca", 1, 0.2),
            frame("a", "ca", 2, 0.7),
            tick("period_end", starts_at),
            presence("b", "cb", connected=False),
        ):
            await handle(envelope)
        # Over, but a is still here: a sweep leaves the group alone.
        await worker._evict_ended()
        assert "g" in worker.groups
        live = worker.groups["g"].hello("a")  # what a would have been told before eviction
        assert live["group_decisions"]["a"] == 0.7 and live["period"]["state"] == "ended"

        store.writing = False  # the store lags from here on
        store.barrier_sent.clear()
        await handle(presence("a", "ca", connected=False))
        await asyncio.wait_for(store.barrier_sent.wait(), TIMEOUT)  # the sweep is waiting
        assert "g" in worker.groups, "evicted before the log held its last rows"

        store.writing = True
        store.write()
        await asyncio.wait_for(directory.forgot.wait(), TIMEOUT)
        assert "g" not in worker.groups
        assert metrics.registry.get_sample_value("canopy_decisions_groups") == 0
        assert metrics.registry.get_sample_value("canopy_decisions_groups_evicted_total") == 1
        assert directory.forgotten == ["g"]
        assert not worker.routes.group("g")

        # a comes back after the end: rebuilt from the log, its hello says how it ended.
        bus.sent.clear()
        await handle(presence("a", "ca2", connected=True))
        hello = next(e.payload for e in bus.sent if e.channel == Channel.HELLO)
        assert hello["group_decisions"] == live["group_decisions"]
        assert hello["period"] == live["period"]
        assert hello["last_seq"] == live["last_seq"] == 2
        assert hello["presence"] == {"a": True, "b": False}
        assert metrics.registry.get_sample_value("canopy_decisions_rebuilds_total") == 1

        directory.forgot.clear()
        await handle(presence("a", "ca2", connected=False))
        await asyncio.wait_for(directory.forgot.wait(), TIMEOUT)
        assert "g" not in worker.groups
        assert metrics.registry.get_sample_value("canopy_decisions_groups_evicted_total") == 2
    finally:
        await worker.close()
        await log_writer.close()
