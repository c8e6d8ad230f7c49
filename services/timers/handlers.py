"""Bus handlers of the timers service: run periods' tick schedules, durably.

A `StartPeriod` command claims the period's schedule in MongoDB (`repository`) before it is
acknowledged: from then on the schedule survives a crash. Each schedule runs as a task that
sleeps until each tick's absolute deadline and publishes it into the group's shard stream, so
decisions sees it in one order with the group's frames; once the broker confirmed a tick, the
schedule records it.

Only the holder of the timers lease runs schedules and consumes commands, so two replicas never
tick one period. A worker that takes the lease (at start, or from a replica that died) resumes
every unfinished schedule: ticks whose deadline passed meanwhile go out at once, marked
`late`, then the original absolute schedule continues. A tick that was published but not yet
recorded when a worker died goes out again; decisions applies each tick once.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from aio_pika.abc import AbstractChannel

from services.common.bus import INPUTS, TIMERS_QUEUE, consume_in_order, input_key
from services.common.logs import context
from services.common.messages import (
    Envelope,
    MessageType,
    PausePeriod,
    ResumePeriod,
    StartPeriod,
    TimerFired,
    WakeAt,
    WokeUp,
    now,
)
from services.common.ports import RoutingPublisher
from services.common.retry import retry_forever
from services.timers.domain import Tick, schedule
from services.timers.metrics import TimersMetrics
from services.timers.repository import TimersRepository

log = logging.getLogger(__name__)


class TimersWorker:
    def __init__(
        self,
        bus: RoutingPublisher,
        repository: TimersRepository,
        metrics: TimersMetrics,
        *,
        owner: str,
        lease_seconds: float = 3.0,
    ) -> None:
        self._bus = bus
        self._repository = repository
        self._metrics = metrics
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._lease_until = float("-inf")
        self._periods: dict[str, asyncio.Task[None]] = {}  # schedule id → its task
        self._consumer: asyncio.Task[None] | None = None
        self._led_since = float("inf")  # epoch time this worker took the lease
        self.leading = asyncio.Event()

    @property
    def consumer(self) -> asyncio.Task[None] | None:
        """The timers queue's consumer while leading, None while standing by (readiness)."""
        return self._consumer

    # -- the lease ---------------------------------------------------------------------------

    async def run(self, channel: AbstractChannel) -> None:
        """Hold the lease (renewing it) and lead while holding it; stand by otherwise."""
        while True:
            held = await self._renew()
            if held and not self.leading.is_set():
                await self._lead(channel)
            elif not held and self.leading.is_set():
                log.error("lost the timers lease; standing by")
                await self._stand_by()
            await asyncio.sleep(self._lease_seconds / 3)

    async def _renew(self) -> bool:
        at = now()
        try:
            if await self._repository.acquire_lease(self._owner, now=at, ttl=self._lease_seconds):
                self._lease_until = at + self._lease_seconds
                return True
            return False
        except Exception as exc:
            log.warning("could not renew the timers lease (%r)", exc)
            return now() < self._lease_until - self._lease_seconds / 3  # keep it while valid

    async def _lead(self, channel: AbstractChannel) -> None:
        self._led_since = now()
        pending = await self._repository.pending()
        for document in pending:
            self._start(document)
        if pending:
            log.info("took the timers lease: resumed %d schedules", len(pending))
        self._metrics.leader.set(1)
        queue = await channel.declare_queue(TIMERS_QUEUE, passive=True)
        self._consumer = asyncio.create_task(
            consume_in_order(
                queue, self.handle, on_malformed=lambda m, e: self._metrics.malformed.inc()
            )
        )
        self.leading.set()

    async def _stand_by(self) -> None:
        self.leading.clear()
        self._metrics.leader.set(0)
        tasks = [t for t in (self._consumer, *self._periods.values()) if t is not None]
        self._consumer = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- commands ----------------------------------------------------------------------------

    async def handle(self, envelope: Envelope) -> None:
        if envelope.type is MessageType.START_PERIOD:
            await self._start_period(envelope)
        elif envelope.type is MessageType.PAUSE_PERIOD:
            await self._pause_period(envelope)
        elif envelope.type is MessageType.RESUME_PERIOD:
            await self._resume_period(envelope)
        elif envelope.type is MessageType.WAKE_AT:
            await self._wake_at(envelope)
        else:
            log.error("unexpected %s on the timers queue: %s", envelope.type, envelope.id)

    async def _pause_period(self, envelope: Envelope) -> None:
        """Stop the period's ticks; the schedule stays paused until it is resumed."""
        key = f"{envelope.group}:{PausePeriod.of(envelope).period}"
        task = self._periods.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await retry_forever(partial(self._repository.pause, key), f"pausing {key}")

    async def _resume_period(self, envelope: Envelope) -> None:
        """Run the rest of the period so that it ends at `ends_at` (from decisions)."""
        command = ResumePeriod.of(envelope)
        key = f"{envelope.group}:{command.period}"
        existing = await self._repository.schedules.find_one({"_id": key})
        if existing is None:
            log.error("resume of %s, which has no schedule", key)
            return
        resumed: dict[str, Any] = {}

        async def resume() -> None:
            resumed.update(
                await self._repository.resume(
                    key,
                    starts_at=command.ends_at - float(existing["length"]),
                    fired=command.next_tick,
                )
            )

        await retry_forever(resume, f"resuming {key}")
        task = self._periods.pop(key, None)
        if task is not None:  # a stale run (a repeated command): the resumed one replaces it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._start(resumed)

    async def _start_period(self, envelope: Envelope) -> None:
        command = StartPeriod.of(envelope)
        claimed: dict[str, Any] = {}

        async def claim() -> None:
            claimed.update(
                await self._repository.claim(
                    session=envelope.session,
                    group=envelope.group,
                    period=command.period,
                    length=command.period_length,
                    num_subperiods=command.num_subperiods,
                    # The period starts when its schedule is durable, or `delay` seconds
                    # later (post_period_delay); its first tick waits until then.
                    now=now() + command.delay,
                )
            )

        # Retried here while MongoDB is away, not requeued: a command requeued over and over
        # would reach the queue's delivery limit and be dead-lettered, its period never run.
        await retry_forever(claim, f"claiming period {command.period} of {envelope.group}")
        document = claimed
        if not document["done"] and not document.get("paused"):
            self._start(document)  # a repeated command for a running period changes nothing

    async def _wake_at(self, envelope: Envelope) -> None:
        """A lobby's wake-up for one person: claimed durably, then run (see the repository)."""
        command = WakeAt.of(envelope)
        participant = envelope.participant or command.participant
        if participant is None:
            raise ValueError(f"WakeAt {envelope.id} names nobody")
        claimed: dict[str, Any] = {}

        async def claim() -> None:
            claimed.update(
                await self._repository.claim_wakeup(
                    session=envelope.session,
                    group=envelope.group,
                    participant=participant,
                    at=command.at,
                    event=command.event,
                )
            )

        await retry_forever(claim, f"claiming a wake-up of {envelope.group}")
        if not claimed["done"]:
            self._start(claimed)

    def _start(self, document: dict[str, Any]) -> None:
        key = str(document["_id"])
        if key in self._periods:
            return
        task = asyncio.create_task(self._run(document))
        if document.get("kind") == "wakeup":
            log.info(
                "wake-up for %s at %.3f scheduled",
                document["participant"],
                document["at"],
                extra=context(str(document["session"]), str(document["group"])),
            )
        else:
            log.info(
                "period %s: ticks scheduled",
                document["period"],
                extra=context(str(document["session"]), str(document["group"])),
            )
        self._periods[key] = task
        self._metrics.periods_running.set(len(self._periods))
        task.add_done_callback(lambda _: self._finished(key))

    def _finished(self, key: str) -> None:
        self._periods.pop(key, None)
        self._metrics.periods_running.set(len(self._periods))

    async def _run(self, document: dict[str, Any]) -> None:
        if document.get("kind") == "wakeup":
            await self._run_wakeup(document)
            return
        ticks = schedule(
            int(document["period"]),
            float(document["starts_at"]),
            float(document["length"]),
            int(document["num_subperiods"]),
        )
        # Each tick is computed when its turn comes (domain.Schedule): however many
        # sub-periods, a running or resumed schedule holds one tick at a time.
        for index, tick in ticks.ticks(int(document["fired"])):
            # Sleeping until an absolute deadline is the timer itself; no drift accumulates.
            await asyncio.sleep(max(0.0, tick.at - now()))
            # Late: its deadline passed before this worker could run it (timers was down).
            late = tick.at < self._led_since
            await retry_forever(partial(self._fire, document, tick, late=late), tick.event)
            fired = index + 1
            record = partial(
                self._repository.record_fired, str(document["_id"]), fired, done=fired == len(ticks)
            )
            await retry_forever(record, f"recording {tick.event}", first_delay=0.1)

    async def _run_wakeup(self, document: dict[str, Any]) -> None:
        """Sleep until the wake-up's time, send its one tick, record it done."""
        at = float(document["at"])
        await asyncio.sleep(max(0.0, at - now()))
        group = str(document["group"])
        woke = WokeUp(
            event=str(document["event"]),
            participant=str(document["participant"]),
            at=at,
            late=at < self._led_since,
        )
        envelope = Envelope[WokeUp](
            type=MessageType.TIMER_FIRED,
            session=str(document["session"]),
            group=group,
            participant=str(document["participant"]),
            channel=str(document["event"]),
            payload=woke,
        )

        async def fire() -> None:
            await self._bus.publish(
                INPUTS, input_key(group, self._bus.topology.shards, "timer"), envelope
            )

        await retry_forever(fire, str(document["event"]))
        self._metrics.ticks.labels(str(document["event"])).inc()
        record = partial(self._repository.record_fired, str(document["_id"]), 1, done=True)
        await retry_forever(record, f"recording {document['event']}", first_delay=0.1)

    async def _fire(self, document: dict[str, Any], tick: Tick, *, late: bool) -> None:
        group = str(document["group"])
        fired = TimerFired(
            event=tick.event,
            period=tick.period,
            index=tick.index,
            starts_at=tick.starts_at,
            ends_at=tick.ends_at,
            late=late,
        )
        envelope = Envelope[TimerFired](
            type=MessageType.TIMER_FIRED,
            session=str(document["session"]),
            group=group,
            channel=tick.event,
            payload=fired,
        )
        await self._bus.publish(
            INPUTS, input_key(group, self._bus.topology.shards, "timer"), envelope
        )
        self._metrics.ticks.labels(tick.event).inc()
        if late:
            self._metrics.late_ticks.inc()
        else:  # the envelope's ts: when it was published (the clock read once)
            self._metrics.tick_drift_seconds.observe(max(0.0, envelope.ts - tick.at))

    async def close(self) -> None:
        was_leading = self.leading.is_set()
        await self._stand_by()
        if was_leading:
            try:  # hand over at once instead of letting the lease expire
                await self._repository.release_lease(self._owner)
            except Exception as exc:
                log.warning("could not release the timers lease (%r)", exc)
