"""Bus handlers of the timers service: run periods' tick schedules.

A `StartPeriod` command publishes `period_start` at once (acknowledged only after the broker
confirmed it) and schedules the rest of the period's ticks on absolute deadlines. Ticks go into
the group's shard stream, so decisions sees them in one order with the group's frames.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.bus import INPUTS, Bus, input_key
from services.common.messages import Envelope, MessageType, now
from services.timers.domain import Tick, schedule
from services.timers.metrics import TimersMetrics

log = logging.getLogger(__name__)


class TimersWorker:
    def __init__(self, bus: Bus, metrics: TimersMetrics) -> None:
        self._bus = bus
        self._metrics = metrics
        self._periods: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def handle(self, envelope: Envelope) -> None:
        if envelope.type is not MessageType.START_PERIOD:
            log.error("unexpected %s on the timers queue: %s", envelope.type, envelope.id)
            return
        payload = envelope.payload
        period = int(payload["period"])
        key = (envelope.group, period)
        if key in self._periods:
            return  # a redelivered command for a period we already run
        ticks = schedule(
            period, now(), float(payload["period_length"]), int(payload.get("num_subperiods", 0))
        )
        await self._fire(envelope, ticks[0])
        task = asyncio.create_task(self._run(envelope, ticks[1:]))
        self._periods[key] = task
        self._metrics.running.set(len(self._periods))
        task.add_done_callback(lambda _: self._finished(key))

    def _finished(self, key: tuple[str, int]) -> None:
        self._periods.pop(key, None)
        self._metrics.running.set(len(self._periods))

    async def _run(self, command: Envelope, ticks: list[Tick]) -> None:
        for tick in ticks:
            # Sleeping until an absolute deadline is the timer itself; no drift accumulates.
            await asyncio.sleep(max(0.0, tick.at - now()))
            while True:
                try:
                    await self._fire(command, tick)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "publishing %s of group %s failed; retrying", tick.event, command.group
                    )
                    await asyncio.sleep(0.5)

    async def _fire(self, command: Envelope, tick: Tick) -> None:
        envelope = Envelope(
            type=MessageType.TIMER_FIRED,
            session=command.session,
            group=command.group,
            channel=tick.event,
            payload=tick.payload(),
        )
        await self._bus.publish(
            INPUTS, input_key(command.group, self._bus.topology.shards, "timer"), envelope
        )
        self._metrics.ticks.labels(tick.event).inc()
        self._metrics.lateness.observe(max(0.0, now() - tick.at))

    async def close(self) -> None:
        tasks = list(self._periods.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
