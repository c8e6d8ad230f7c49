"""The event log's way out of decisions: records batched into `LogBatch` messages.

Decisions sees every input and output of its groups in their one order, so it is where the log
is written from: every accepted frame (in) and every broadcast (out) becomes a record, and
records are published together every `interval` seconds (or at `max_records`). An input is
acknowledged to the broker only after the batch holding its records was confirmed, so the log
misses nothing; one message per batch instead of one per event keeps the broker's and the
store's work per decision low.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.bus import LOG, LOG_KEY, Bus
from services.common.messages import LogBatch, LogRecord

log = logging.getLogger(__name__)


class LogWriter:
    def __init__(self, bus: Bus, *, interval: float, max_records: int) -> None:
        self._bus = bus
        self._interval = interval
        self._max_records = max_records
        self._records: list[LogRecord] = []
        self._written: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, records: list[LogRecord]) -> asyncio.Future[None]:
        """Queue records; the future completes when the broker confirmed their batch."""
        loop = asyncio.get_running_loop()
        if self._written is None:
            self._written = loop.create_future()
            self._timer = loop.call_later(self._interval, self.flush)
        written = self._written
        self._records.extend(records)
        if len(self._records) >= self._max_records:
            self.flush()
        return written

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._written is None:
            return
        records, written = self._records, self._written
        self._records, self._written = [], None
        task = asyncio.get_running_loop().create_task(self._publish(records, written))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, records: list[LogRecord], written: asyncio.Future[None]) -> None:
        try:
            if records:
                await self._bus.publish_reliably(LOG, LOG_KEY, LogBatch(records=records))
        except BaseException as exc:
            if not written.done():
                written.set_exception(exc)
            raise
        if not written.done():
            written.set_result(None)

    async def close(self) -> None:
        self.flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
