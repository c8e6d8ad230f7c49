"""The store's bus handler: write every logged event to MongoDB in batches.

Messages are buffered as they arrive and written with one unordered `insert_many` when the batch
is full or `store_batch_seconds` have passed. The broker is acknowledged only after MongoDB took
the batch; on a failure the whole batch is requeued, and the unique `_id` of each event makes
the retry harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common.messages import Channel, Envelope, MessageType
from services.store.domain import event_document
from services.store.metrics import StoreMetrics
from services.store.repository import Repository

log = logging.getLogger(__name__)


def status_update(envelope: Envelope) -> tuple[str, str, dict[str, Any]] | None:
    """The live status (for the monitor) that a logged broadcast changes, or None."""
    if envelope.type is not MessageType.BROADCAST or not isinstance(envelope.payload, dict):
        return None
    payload = envelope.payload
    if envelope.channel == Channel.PRESENCE:
        return "participants", str(payload["participant"]), {"connected": payload["connected"]}
    if envelope.channel == Channel.PERIOD_START:
        period = {"number": payload["period"], "state": "running", "ends_at": payload["ends_at"]}
        return "groups", envelope.group, {"period": period}
    if envelope.channel == Channel.PERIOD_END:
        period = {"number": payload["period"], "state": "ended", "ends_at": None}
        return "groups", envelope.group, {"period": period}
    return None


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
        self._buffer: list[tuple[AbstractIncomingMessage, Envelope]] = []
        self._full = asyncio.Event()
        self.written_batches = 0
        self._failures = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = Envelope.decode(message.body)
        except ValueError as exc:
            log.error("malformed message on the store queue rejected: %s", exc)
            self._metrics.rejected.inc()
            await message.reject(requeue=False)
            return
        self._buffer.append((message, envelope))
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    async def run(self, queue: AbstractQueue) -> None:
        await queue.consume(self.on_message)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self._batch_seconds)
            self._full.clear()
            if self._buffer:
                batch, self._buffer = self._buffer, []
                await self._write(batch)

    async def _write(self, batch: list[tuple[AbstractIncomingMessage, Envelope]]) -> None:
        documents = [d for _, e in batch if (d := event_document(e)) is not None]
        last = max((m for m, _ in batch), key=lambda m: m.delivery_tag or 0)
        started = time.perf_counter()
        try:
            inserted = await self._repository.insert_events(documents)
            await self._repository.apply_status(
                u for _, e in batch if (u := status_update(e)) is not None
            )
        except Exception:
            log.exception("writing a batch of %d events failed; requeued", len(documents))
            self._metrics.failures.inc()
            await last.nack(multiple=True, requeue=True)
            self._failures += 1
            await asyncio.sleep(min(0.1 * 2**self._failures, 5.0))  # back off while MongoDB is down
            return
        self._failures = 0
        await last.ack(multiple=True)
        self.written_batches += 1
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(documents))
        self._metrics.duplicates.inc(len(documents) - inserted)
        for document in documents:
            self._metrics.events.labels(document["direction"]).inc()
