"""The store's bus handler: write every logged event to MongoDB in batches.

Each message is a `LogBatch` from decisions. Messages are buffered as they arrive and their
records written with one unordered `insert_many` when `store_batch_size` records are waiting
or `store_batch_seconds` have passed. The broker is acknowledged only after MongoDB took
the batch; while MongoDB fails the batch is held and written again until it succeeds, and the
unique `_id` of each event makes a repeated write harmless.

When the broker connection drops, messages received on the old channel can no longer be
acknowledged (the broker requeues them by itself); a batch may mix them with messages of the
restored channel, whose delivery tags start again at 1. So each channel's messages are acked
on that channel, and a failed ack never stops the writer: before this, one failed ack ended the
writer's loop and every later message stayed unwritten (issue: ~1,000 acknowledged frames
missing from the export after a broker restart).

A `LogBatch` may carry a `barrier` (a decisions worker starting up): it is recorded after the
batch holding it was written, so the worker knows that everything sent before it is in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common.logs import context
from services.common.messages import Channel, LogBatch, LogRecord, now
from services.common.retry import retry_forever
from services.store.domain import event_document
from services.store.metrics import StoreMetrics
from services.store.repository import Repository

log = logging.getLogger(__name__)


def status_updates(record: LogRecord) -> list[tuple[str, str, dict[str, Any]]]:
    """The live status (monitor, session detail) that a logged broadcast changes: presence,
    each group's period, and at a period's end each member's payoff for it."""
    if record.direction != "out" or not isinstance(record.value, dict):
        return []
    value = record.value
    if record.channel == Channel.PRESENCE:
        return [("participants", str(value["participant"]), {"connected": value["connected"]})]
    if record.channel == Channel.PERIOD_START:
        period = {"number": value["period"], "state": "running", "ends_at": value["ends_at"]}
        return [("groups", record.group, {"period": period})]
    if record.channel == Channel.PERIOD_PAUSED:
        period = {"number": value["period"], "state": "paused", "ends_at": None}
        return [("groups", record.group, {"period": period})]
    if record.channel == Channel.PERIOD_RESUMED:
        period = {"number": value["period"], "state": "running", "ends_at": value["ends_at"]}
        return [("groups", record.group, {"period": period})]
    if record.channel == Channel.PERIOD_END:
        period = {"number": value["period"], "state": "ended", "ends_at": None}
        payoffs = value.get("payoffs") or {}
        return [("groups", record.group, {"period": period})] + [
            ("participants", str(code), {f"payoffs.{value['period']}": payoff})
            for code, payoff in payoffs.items()
        ]
    return []


class EventWriter:
    def __init__(
        self,
        repository: Repository,
        metrics: StoreMetrics,
        *,
        batch_size: int,
        batch_seconds: float,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_seconds = batch_seconds
        self._buffer: list[tuple[AbstractIncomingMessage, LogBatch]] = []
        self._waiting = 0  # records in the buffer
        self._full = asyncio.Event()
        self.written_batches = 0
        # LogBatch ts of the batches being written now (taken out of the buffer), oldest first.
        self._writing: list[float] = []
        metrics.lag_seconds.set_function(self.lag)

    def lag(self) -> float:
        """Age of the oldest event received and not written yet; 0 when all are written."""
        pending = self._writing[:1] + [batch.ts for _, batch in self._buffer[:1]]
        return max(0.0, now() - min(pending)) if pending else 0.0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = LogBatch.decode(message.body)
        except ValueError as exc:
            log.error(
                "malformed message on the store queue rejected: %s",
                exc,
                extra=context(message_id=message.message_id),
            )
            self._metrics.rejected.inc()
            await message.reject(requeue=False)
            return
        self._buffer.append((message, batch))
        self._waiting += len(batch.records)
        if self._waiting >= self._batch_size:
            self._full.set()

    async def run(self, queue: AbstractQueue) -> None:
        await queue.consume(self.on_message)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self._batch_seconds)
            self._full.clear()
            if self._buffer:
                batch, self._buffer, self._waiting = self._buffer, [], 0
                self._writing = [b.ts for _, b in batch[:1]]
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never stop writing: unacked messages come back anyway
                    log.exception("writing a batch failed unexpectedly; its messages come back")
                finally:
                    self._writing = []

    async def _write(self, batch: list[tuple[AbstractIncomingMessage, LogBatch]]) -> None:
        records = [r for _, b in batch for r in b.records]
        documents = [event_document(r) for r in records]
        barriers = [b.barrier for _, b in batch if b.barrier is not None]
        started = time.perf_counter()
        inserted = 0

        async def write() -> None:
            nonlocal inserted
            inserted = await self._repository.insert_events(documents)
            await self._repository.apply_status(
                update for record in records for update in status_updates(record)
            )
            if barriers:
                await self._repository.record_barriers(barriers)

        # Held (unacknowledged) and retried while MongoDB is away, however long: requeueing
        # would count against the queue's delivery limit and dead-letter the log in the end.
        await retry_forever(
            write,
            f"writing a batch of {len(documents)} events",
            first_delay=0.1,
            max_delay=5.0,
            on_retry=lambda exc: self._metrics.failures.inc(),
        )
        await _ack(batch)
        self.written_batches += 1
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(documents))
        self._metrics.duplicates.inc(len(documents) - inserted)
        inbound = sum(1 for record in records if record.direction == "in")
        self._metrics.events_in.inc(inbound)
        self._metrics.events_out.inc(len(records) - inbound)


async def _ack(batch: list[tuple[AbstractIncomingMessage, LogBatch]]) -> None:
    """Ack a written batch's messages: per channel, up to each one's last delivery tag.

    A message of a channel that closed meanwhile cannot be acked, and need not be: the broker
    requeued it when the channel closed, and its events are written again as duplicates."""
    last: dict[int, AbstractIncomingMessage] = {}
    for message, _ in batch:
        key = id(message.channel)
        if key not in last or (message.delivery_tag or 0) > (last[key].delivery_tag or 0):
            last[key] = message
    for message in last.values():
        try:
            await message.ack(multiple=True)
        except Exception as exc:
            log.warning("could not ack messages of a closed channel (%r): redelivered", exc)
