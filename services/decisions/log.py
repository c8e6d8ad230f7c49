"""The event log's way out of decisions: records batched into `LogBatch` messages.

Decisions sees every input and output of its groups in their one order, so it is where the log
is written from: every accepted frame (in) and every broadcast (out) becomes a record, and
records are published together every `interval` seconds, or sooner once a batch holds
`max_records` records or `max_bytes` of them. One input's records go in one batch (the current
one is sent first if they do not fit in what is left of it), unless they alone exceed a batch.
An input is acknowledged to the broker only after the batch holding its records was confirmed
(every batch, when its records span two), so the log misses nothing; one message per batch
instead of one per event keeps the broker's and the store's work per decision low.

Batches are cut by size, not only by count: with records of up to 256 KiB each (PROTOCOL v2
"Size"), a count alone lets one message grow past what the broker accepts (RabbitMQ's
`max_message_size`, 128 MiB by default), and a publish that can never succeed is retried
forever. A record's size is estimated when it is added, from its value's JSON (orjson, a few
µs for the biggest) and its strings; a record bigger than the budget goes alone.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from services.common.bus import LOG, LOG_KEY
from services.common.bus.batcher import Batch, Gathering, all_of
from services.common.messages import LogBatch, LogRecord
from services.common.ports import Publisher

log = logging.getLogger(__name__)

# Far below the broker's limit, and a batch the store writes in one go.
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
# A `LogBatch`'s JSON around its records (id, type, version, ts, barrier), kept free.
BATCH_OVERHEAD_BYTES = 256
# A record's JSON around its strings and value: its keys, `ts`, `direction`, `seq`, quotes.
RECORD_OVERHEAD_BYTES = 160


def record_size(record: LogRecord) -> int:
    """About the length of the record's JSON in a `LogBatch` (an estimate: float digits may
    differ by a few bytes between encoders; the ids and names are ASCII)."""
    try:
        value = len(orjson.dumps(record.value))
    except (TypeError, orjson.JSONEncodeError):  # what orjson does not take (an int > 64 bits)
        value = len(LogRecord.__pydantic_serializer__.to_json(record))
    return (
        RECORD_OVERHEAD_BYTES
        + len(record.id)
        + len(record.session)
        + len(record.group)
        + len(record.participant or "")
        + len(record.channel)
        + value
    )


class LogWriter:
    def __init__(
        self,
        bus: Publisher,
        *,
        interval: float,
        max_records: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._bus = bus
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._gathering: Gathering[LogRecord] = Gathering(interval, self.flush)
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, records: list[LogRecord]) -> asyncio.Future[None]:
        """Queue records; the future completes when the broker confirmed every batch holding
        them (one, or several when they alone exceed one)."""
        batches: list[asyncio.Future[None]] = []
        sizes = [record_size(record) for record in records]
        budget, total = self._max_bytes - BATCH_OVERHEAD_BYTES, sum(sizes)
        # One input's records travel together when they fit in one batch: the one being
        # filled, else a new one. Split, a crash between the two publishes would leave a
        # prefix of them logged (`period_end` without its `finished` rows), and the input,
        # redelivered, is then seen as applied: the rest would never be written.
        fits_alone = len(records) <= self._max_records and total <= budget
        here = self._gathering.open
        if (
            here is not None
            and fits_alone
            and not here.fits(total, self._max_records, budget, len(records))
        ):
            self.flush()
        for record, size in zip(records, sizes, strict=True):
            batch = self._batch()
            if not batch.offer(record, size, self._max_records, budget):
                self.flush()
                batch = self._batch()
                batch.add(record, size)
            if not batches or batches[-1] is not batch.confirmed:
                batches.append(batch.confirmed)
            if len(batch.items) >= self._max_records:
                self.flush()
        if not batches:
            batches.append(self._batch().confirmed)
        return batches[0] if len(batches) == 1 else all_of(batches)

    def _batch(self) -> Batch[LogRecord]:
        """The batch being filled (a new one, with its timer, if none is)."""
        return self._gathering.batch()

    def flush(self) -> None:
        batch = self._gathering.take()
        if batch is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(batch.items, batch.confirmed))
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
