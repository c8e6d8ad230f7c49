"""The decisions and timers workers on the in-memory bus (tests/memory_bus.py): a group's whole
period, a redelivery after a worker's crash, and a shard moving to another worker, in about a
second, with no broker and no store.

Everything runs as in production but for the broker and MongoDB: the shard queue is consumed by
`consume_pipelined` (acknowledged once the outputs are confirmed), the timers' queue by the
timers worker's own lease loop, the log goes to a store that writes it, and the test plays the
gateway: it publishes presences and frames as the gateway does (`input_key`), reads the
gateway's queue, and answers a `Resync` by announcing its connections again. The end-to-end
tests (tests/e2e/test_core_loop.py, tests/faults) play the same stories on the real stack.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

from aio_pika.abc import AbstractChannel, AbstractQueue

from services.common.bus import (
    GATEWAYS,
    INPUTS,
    LOG,
    TIMERS_QUEUE,
    InputKind,
    consume_pipelined,
    input_key,
    shard_of,
    shard_queue,
)
from services.common.directory import GroupConfig
from services.common.messages import (
    Channel,
    Envelope,
    MessageType,
    PresenceChanged,
    Resync,
)
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.timers.handlers import TimersWorker
from services.timers.metrics import TimersMetrics
from services.timers.repository import TimersRepository
from tests.memory_bus import (
    FakeDirectory,
    FakeStore,
    MemoryBus,
    MemoryTimersRepository,
    decode,
)

TIMEOUT = 5.0
PERIOD = 1.2  # seconds; two sub-periods, at 0.6 s and at the end
CONFIG = GroupConfig(
    session="s",
    group="g",
    experiment="decisions",
    members=["a", "b"],
    num_periods=1,
    period_length=PERIOD,
    num_subperiods=2,
    rate_limit=0.0,
    params={},
)
CONNECTIONS = {"a": "ca", "b": "cb"}


class Decisions:
    """One decisions worker, claiming and releasing the group's shard as decisions/app.py's
    `claim` and `release` do."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.metrics = DecisionsMetrics()
        self.log = LogWriter(stack.bus, interval=0.005, max_records=100)
        self.worker = DecisionsWorker(
            stack.bus, stack.directory, self.metrics, self.log, resync_window=TIMEOUT
        )
        self.stop = asyncio.Event()
        self.consumer: asyncio.Task[None] | None = None

    async def claim(self) -> None:
        await self.worker.wait_for_log(poll=0.001)
        queue = cast(AbstractQueue, self.stack.shard)  # what consume_pipelined uses of one
        consume = consume_pipelined(queue, self.worker.handle, stop=self.stop)
        self.consumer = asyncio.create_task(consume)
        await self.worker.request_resync([self.stack.index])

    async def release(self) -> None:
        """Hand the shard over: what was handled is acknowledged, the groups dropped."""
        assert self.consumer is not None
        self.stop.set()
        await asyncio.wait_for(self.consumer, TIMEOUT)
        self.worker.forget_shard(self.stack.index, self.stack.bus.shards)
        await self.close()

    async def crash(self) -> None:
        """Die with inputs unacknowledged: the broker requeues them when the channel goes."""
        assert self.consumer is not None
        self.consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.consumer
        self.stack.shard.close_channel()

    async def close(self) -> None:
        await self.worker.close()
        await self.log.close()

    def counted(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class Stack:
    """The bus, the store, the timers worker, and the test's gateway (queue "gw")."""

    def __init__(self) -> None:
        self.store = FakeStore()
        self.bus = MemoryBus(self.store)
        self.directory = FakeDirectory(self.store, CONFIG)
        self.index = shard_of(CONFIG.group, self.bus.shards)
        self.shard = self.bus.queues[shard_queue(self.index)]
        self.gateway = self.bus.declare("gw")
        self.resyncs = self.bus.declare("gw.resync")
        self.bus.bind(GATEWAYS, "", self.resyncs)
        self.received: list[Envelope] = []  # what the gateway was sent, in order
        self.open: set[str] = set()  # members with an open connection on the gateway
        self.schedules = MemoryTimersRepository()
        self.timers = TimersWorker(
            self.bus,
            cast(TimersRepository, self.schedules),  # the part of it the timers use here
            TimersMetrics(),
            owner="timers",
            lease_seconds=30.0,
        )
        self.timers_task: asyncio.Task[None] | None = None

    async def start_timers(self) -> None:
        channel = cast(AbstractChannel, self.bus.channel())
        self.timers_task = asyncio.create_task(self.timers.run(channel))
        await asyncio.wait_for(self.timers.leading.wait(), TIMEOUT)

    async def close(self) -> None:
        if self.timers_task is not None:
            self.timers_task.cancel()
            await asyncio.gather(self.timers_task, return_exceptions=True)
        await self.timers.close()

    # -- the gateway -------------------------------------------------------------------------

    async def publish(self, kind: InputKind, envelope: Envelope) -> None:
        key = input_key(envelope.group, self.bus.shards, kind)
        await self.bus.publish(INPUTS, key, envelope)

    async def connect(self, code: str, *, connected: bool = True) -> None:
        (self.open.add if connected else self.open.discard)(code)
        presence = Envelope[PresenceChanged](
            type=MessageType.PRESENCE_CHANGED,
            session="s",
            group="g",
            participant=code,
            connection=CONNECTIONS[code],
            gateway="gw",
            payload=PresenceChanged(connected=connected),
        )
        await self.publish("presence", presence)

    async def decide(self, code: str, seq: int, value: float) -> None:
        frame = Envelope(
            type=MessageType.FRAME_ACCEPTED,
            session="s",
            group="g",
            participant=code,
            seq=seq,
            channel="decisions",
            connection=CONNECTIONS[code],
            gateway="gw",
            payload=value,
        )
        await self.publish("frame", frame)

    async def until(self, condition: Callable[[list[Envelope]], Any]) -> Any:
        """What `condition` returns of everything the gateway received, once truthy."""

        async def wait() -> Any:
            while not (found := condition(self.received)):
                await self.gateway.wait_for(lambda: self.gateway.ready)
                self.received.extend(self.gateway.envelopes())
            return found

        return await asyncio.wait_for(wait(), TIMEOUT)

    async def answer_resync(self) -> list[int] | None:
        """The gateway's side of a `Resync`: announce each connection again."""
        await asyncio.wait_for(self.resyncs.wait_for(lambda: self.resyncs.ready), TIMEOUT)
        (resync,) = self.resyncs.envelopes()
        shards = Resync.of(resync).shards
        if shards is None or self.index in shards:
            for code in sorted(self.open):
                await self.connect(code)
        return shards

    def rows(self, direction: str) -> list[tuple[Any, ...]]:
        return [
            (r["participant"], r["channel"], r["seq"])
            for r in self.store.rows
            if r["direction"] == direction
        ]


def channels(envelopes: list[Envelope], participant: str | None = None) -> list[str]:
    """The channels of the frames to the whole group (or to one member)."""
    return [e.channel or "" for e in envelopes if e.participant == participant]


def last(channel: str, participant: str | None = None) -> Callable[[list[Envelope]], Any]:
    """A condition: the payload of the last `channel` frame received (to `participant`)."""

    def found(envelopes: list[Envelope]) -> Any:
        hits = [e for e in envelopes if e.channel == channel and e.participant == participant]
        return hits[-1].payload if hits else None

    return found


async def test_a_group_plays_its_period_through_the_bus_and_the_timers() -> None:
    stack = Stack()
    decisions = Decisions(stack)
    try:
        await stack.start_timers()
        await decisions.claim()
        assert await stack.answer_resync() == [stack.index]  # nobody is connected yet

        await stack.connect("a")
        await stack.connect("b")  # complete: the period starts (timers: StartPeriod)
        start = await stack.until(last(Channel.PERIOD_START))
        assert start["period"] == 1 and start["length"] == PERIOD
        claimed = stack.schedules.documents["g:1"]
        assert (claimed["length"], claimed["num_subperiods"]) == (PERIOD, 2)

        await stack.decide("a", 1, 0.2)
        await stack.decide("b", 1, 0.7)
        await stack.decide("a", 2, 0.4)
        end = await stack.until(last(Channel.PERIOD_END))
        assert end["group_decisions"] == {"a": 0.4, "b": 0.7}
        for code in ("a", "b"):  # the last period's end: each member's outcome
            finished = await stack.until(last(Channel.FINISHED, code))
            assert finished["outcome"] == "completed"

        await stack.shard.settled()  # every input acknowledged: its rows are in the log
        group = channels(stack.received)
        assert group[: group.index(Channel.PERIOD_START)].count(Channel.PRESENCE) >= 1
        assert [c for c in group if c not in (Channel.PRESENCE, Channel.GROUP_DECISIONS)] == [
            Channel.PERIOD_START,
            Channel.SUBPERIOD,
            Channel.SUBPERIOD,
            Channel.PERIOD_END,
        ]
        assert group.count(Channel.GROUP_DECISIONS) == 3  # one per frame (no rate limit)
        assert channels(stack.received, "a")[:1] == [Channel.HELLO]
        # Each frame in the log once, in order; every input acknowledged, none dead.
        assert [r for r in stack.rows("in")] == [
            ("a", "decisions", 1),
            ("b", "decisions", 1),
            ("a", "decisions", 2),
        ]
        assert stack.shard.dead == [] and stack.shard.acked == stack.shard.deliveries == 9
        timers = stack.bus.queues[TIMERS_QUEUE]
        await timers.settled()
        assert timers.acked == 1  # the one StartPeriod
        (schedule,) = stack.schedules.documents.values()
        assert schedule["fired"] == 4  # start, 2 sub-periods, end (recorded as they went)
    finally:
        await decisions.close()
        await stack.close()


async def test_an_input_redelivered_after_a_crash_is_applied_and_logged_once() -> None:
    """A worker applied a frame and sent its broadcast and its log batch, then died before the
    batch was confirmed, so before acknowledging the frame. The broker delivers the frame
    again, to the next worker, which rebuilds the group from the log (holding the frame's row,
    which the broker had) and recognises it: applied once, logged once."""
    stack = Stack()
    first = Decisions(stack)
    second = Decisions(stack)
    try:
        await stack.start_timers()
        await first.claim()
        await stack.answer_resync()
        await stack.connect("a")
        await stack.connect("b")
        await stack.until(last(Channel.PERIOD_START))
        await stack.decide("a", 1, 0.2)
        await stack.until(last(Channel.GROUP_DECISIONS))
        await stack.shard.settled()  # all acknowledged so far

        stack.bus.hold(LOG)  # the next log batch's confirm does not come back
        await stack.decide("a", 2, 0.9)
        await stack.until(lambda got: (last(Channel.GROUP_DECISIONS)(got) or {}).get("a") == 0.9)
        assert stack.shard.unacked  # the frame waits for its log batch's confirm
        await first.crash()
        again = [e for m in stack.shard.ready if m.redelivered for e in decode(m.body, m.type)]
        assert ("a", 2) in [(e.participant, e.seq) for e in again]
        stack.bus.release(LOG)  # the broker had the batch: the store writes it
        await first.close()

        stack.received.clear()
        await second.claim()
        await stack.answer_resync()
        hello = await stack.until(last(Channel.HELLO, "a"))
        assert hello["last_seq"] == 2 and hello["group_decisions"]["a"] == 0.9
        await stack.shard.settled()
        assert second.counted("canopy_decisions_frames_total", outcome="duplicate") == 1
        assert [r for r in stack.rows("in")] == [("a", "decisions", 1), ("a", "decisions", 2)]
        # The redelivered frame was no new decision: no broadcast of its own the second time.
        assert channels(stack.received).count(Channel.GROUP_DECISIONS) == 0
    finally:
        await second.close()
        await stack.close()


async def test_a_shard_moves_to_another_worker_in_the_middle_of_a_period() -> None:
    """The first worker hands the shard over (its consumer stops, what it handled is
    acknowledged, its groups dropped); the second waits for the log, consumes, asks the
    gateways to announce the shard's connections again, and carries the period on from the
    log: the members' hello holds what was decided, and the period ends over all of it."""
    stack = Stack()
    first = Decisions(stack)
    second = Decisions(stack)
    try:
        await stack.start_timers()
        await first.claim()
        await stack.answer_resync()
        await stack.connect("a")
        await stack.connect("b")
        await stack.until(last(Channel.PERIOD_START))
        await stack.decide("a", 1, 0.3)
        await stack.decide("b", 1, 0.6)
        await stack.until(lambda got: channels(got).count(Channel.GROUP_DECISIONS) == 2)

        await first.release()
        assert "g" not in first.worker.groups and stack.shard.idle
        stack.received.clear()
        await second.claim()
        assert await stack.answer_resync() == [stack.index]
        for code in ("a", "b"):
            hello = await stack.until(last(Channel.HELLO, code))
            assert hello["group_decisions"] == {"a": 0.3, "b": 0.6}
            assert hello["period"]["state"] == "running" and hello["last_seq"] == 1
        assert second.counted("canopy_decisions_rebuilds_total") == 1

        await stack.decide("a", 2, 0.1)
        end = await stack.until(last(Channel.PERIOD_END))
        assert end["group_decisions"] == {"a": 0.1, "b": 0.6}
        await stack.shard.settled()  # every input acknowledged: its rows are in the log
        assert stack.shard.dead == []
        assert [r for r in stack.rows("in")] == [
            ("a", "decisions", 1),
            ("b", "decisions", 1),
            ("a", "decisions", 2),
        ]
        ends = [r for r in stack.rows("out") if r[1] == Channel.PERIOD_END]
        assert len(ends) == 1  # one period_end, from the second worker
        await asyncio.wait_for(stack.schedules.recorded.wait(), TIMEOUT)
        assert [d["done"] for d in stack.schedules.documents.values()] == [True]
    finally:
        await first.close()
        await second.close()
        await stack.close()
