"""The store's bus handler: write every record of the event log to MongoDB in batches.

Each message is a `LogBatch` from decisions. Messages are gathered as they arrive
(`services.common.bus.batcher.Gathering`, the rule decisions' log writer cuts its batches by)
and their records written in one go once `store_batch_size` records are waiting, or
`store_batch_seconds` after the first of them arrived; what arrives during a write waits for
the next one. The broker is acknowledged only after MongoDB took the batch; while MongoDB fails
the batch is held and written again until it succeeds, and the unique `_id` of each event
makes a repeated write harmless.

What the store holds is bounded in bytes, not only in messages: the channel's prefetch is
`StoreSettings.store_prefetch()` (CANOPY_STORE_BUFFER_BYTES over the largest message decisions
sends), and a batch is also due once it holds half of that prefetch (docs/reliability.md,
"RabbitMQ blocks publishers"); what is not delivered yet waits in RabbitMQ.

When the broker connection drops, messages received on the old channel can no longer be
acknowledged (the broker requeues them by itself); a batch may mix them with messages of the
restored channel, whose delivery tags start again at 1. So each channel's messages are acked
on that channel, and a failed ack never stops the writer: before this, one failed ack ended the
writer's loop and every later message stayed unwritten (issue: ~1,000 acknowledged frames
missing from the export after a broker restart).

A `LogBatch` may carry a `barrier` (a decisions worker starting up): it is recorded after the
batch holding it was written, so the worker knows that everything sent before it is in the log.

Only failures that a retry can cure are retried (MongoDB away, a timeout, a failover). A record
that no retry can write (its document is over MongoDB's 16 MiB, or the server refuses it) is
*poison*: retrying its batch forever would stop the whole log. It is set aside in the
`quarantine` collection (with the error, its size and the start of its value), counted in
`canopy_store_quarantined_total` and reported once (an ERROR line of the store's own logging);
the rest of its batch is written and acked.
Oversize documents are caught before the batch goes out (`repository.oversize`); the others
when the server names them (a write error per document) or, for an error that names none,
by writing that batch's events one by one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common.bus.batcher import Batch, Gathering
from services.common.logs import context
from services.common.messages import Channel, LogBatch, LogRecord, now
from services.common.retry import retry_forever
from services.store.domain import event_document
from services.store.metrics import StoreMetrics
from services.store.repository import (
    INVALID,
    MAX_DOCUMENT_BYTES,
    TOO_LARGE,
    Repository,
    bson_size,
    oversize,
    permanent_failure,
    refused_documents,
)

log = logging.getLogger(__name__)

# The channel of a seat's `finished` message: an `out` row addressed to that participant.
FINISHED = "finished"
LOBBY_JOIN, LOBBY_LEAVE = "lobby_join", "lobby_leave"  # services.common.lobby's rows
# A message of the store queue and the `LogBatch` it holds.
Delivery = tuple[AbstractIncomingMessage, LogBatch]


def status_updates(record: LogRecord) -> list[tuple[str, str, dict[str, Any]]]:
    """The live status (monitor, session detail) that a logged broadcast changes: presence
    (and that a seat was ever seen), each group's period, at a period's end each member's
    payoff for it, and a seat's outcome when it finished (PROTOCOL v2 "Online studies")."""
    if record.direction != "out" or not isinstance(record.value, dict):
        return []
    value = record.value
    if record.channel == Channel.PRESENCE:
        if value.get("bot"):  # a bot plays the seat (PROTOCOL v2): no person is connected
            played = {"connected": False, "bot_played": True, "taken": True}
            return [("participants", str(value["participant"]), played)]
        fields: dict[str, Any] = {"connected": value["connected"]}
        if value["connected"] is True:
            fields["seen"] = True  # the session detail's status `playing`
            # A seat someone played (its own link, or a bot) is nobody else's: the study link
            # never gives it to a newcomer, who would take over that play and its payoffs.
            fields["taken"] = True
        return [("participants", str(value["participant"]), fields)]
    if record.channel == LOBBY_JOIN and record.group == "":
        # PROTOCOL v2 "The lobby": waiting for a group (the session detail's status `lobby`).
        fields = {"connected": True, "seen": True, "taken": True, "lobby_since": value["arrived"]}
        return [("participants", str(value["participant"]), fields)]
    if record.channel == LOBBY_LEAVE and record.group == "":
        return [("participants", str(value["participant"]), {"connected": False})]
    if record.channel == FINISHED and record.participant:
        finished = {"outcome": value.get("outcome"), "finished_at": record.ts}
        return [("participants", record.participant, finished)]
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
        prefetch: int | None = None,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._batch_size = batch_size
        # The channel's prefetch (StoreSettings.store_prefetch: bounded by bytes, so it may be
        # far fewer messages than batch_size records): a batch holding half of it is due, so
        # the other half keeps arriving while it is written.
        self._due_messages = max(1, prefetch // 2) if prefetch is not None else None
        # Set when the batch being gathered is due: full, or its time is up.
        self._due = asyncio.Event()
        # The messages received and not yet being written; a batch's size counts its records.
        self._gathering: Gathering[Delivery] = Gathering(batch_seconds, self._due.set)
        self.written_batches = 0
        # LogBatch ts of the batch being written now (taken out of the gathering), oldest first.
        self._writing: list[float] = []
        metrics.lag_seconds.set_function(self.lag)

    def lag(self) -> float:
        """Age of the oldest event received and not written yet; 0 when all are written."""
        gathered = self._gathering.open
        waiting = gathered.items[:1] if gathered is not None else []
        pending = self._writing[:1] + [batch.ts for _, batch in waiting]
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
            self._metrics.malformed.inc()
            await message.reject(requeue=False)
            return
        gathered = self._gathering.batch()
        gathered.add((message, batch), len(batch.records))
        if gathered.size >= self._batch_size or (
            self._due_messages is not None and len(gathered.items) >= self._due_messages
        ):
            self._due.set()

    async def run(self, queue: AbstractQueue) -> None:
        await queue.consume(self.on_message)
        while True:
            await self._due.wait()
            self._due.clear()
            gathered = self._gathering.take()
            if gathered is not None:
                await self._write_gathered(gathered)

    async def _write_gathered(self, gathered: Batch[Delivery]) -> None:
        """Write a batch taken from the gathering; its future completes once it is written and
        acked (cancelled if the write failed unexpectedly: its messages come back)."""
        batch = gathered.items
        self._writing = [b.ts for _, b in batch[:1]]
        try:
            await self._write(batch)
        except asyncio.CancelledError:
            gathered.confirmed.cancel()
            raise
        except Exception:  # never stop writing: unacked messages come back anyway
            gathered.confirmed.cancel()
            log.exception("writing a batch failed unexpectedly; its messages come back")
        else:
            gathered.confirmed.set_result(None)
        finally:
            self._writing = []

    async def _write(self, batch: list[Delivery]) -> None:
        records = [r for _, b in batch for r in b.records]
        entries, poison = screen(records)
        barriers = [b.barrier for _, b in batch if b.barrier is not None]
        started = time.perf_counter()
        inserted = 0
        refused: list[Poison] = []
        quarantined: set[str] = set()  # ids set aside for the first time (over every attempt)

        async def write() -> None:
            nonlocal inserted, refused
            inserted, refused = await self._insert(entries)
            if poison or refused:
                documents = [quarantine_document(p) for p in (*poison, *refused)]
                quarantined.update(await self._repository.quarantine_events(documents))
            unwritten = {p.record.id for p in (*poison, *refused)}
            await self._repository.apply_status(
                update
                for record in records
                if record.id not in unwritten  # a poison row's status update may be as big
                for update in status_updates(record)
            )
            if barriers:
                await self._repository.record_barriers(barriers)

        # Held (unacknowledged) and retried while MongoDB is away, however long: requeueing
        # would count against the queue's delivery limit and dead-letter the log in the end.
        await retry_forever(
            write,
            f"writing a batch of {len(records)} events",
            first_delay=0.1,
            max_delay=5.0,
            on_retry=lambda exc: self._metrics.batch_failures.inc(),
        )
        for item in (*poison, *refused):
            if item.record.id in quarantined:  # once, not again for a redelivered batch
                self._report(item)
        await _ack(batch)
        self.written_batches += 1
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(records))
        unwritten = {p.record.id for p in (*poison, *refused)}
        logged = [r for r in records if r.id not in unwritten]
        self._metrics.duplicates.inc(len(logged) - inserted)
        inbound = sum(1 for record in logged if record.direction == "in")
        self._metrics.events_in.inc(inbound)
        self._metrics.events_out.inc(len(logged) - inbound)

    async def _insert(self, entries: list[Entry]) -> tuple[int, list[Poison]]:
        """Insert the batch (one transaction: `Repository.insert_events`); when the server
        refuses documents for good, write the rest and return those as poison. Any other error
        propagates (the whole batch is retried)."""
        refused: list[Poison] = []
        while True:
            try:
                return await self._repository.insert_events([d for _, d in entries]), refused
            except Exception as exc:
                named = refused_documents(exc)
                if named is None:
                    if permanent_failure(exc) is None:
                        raise
                    log.warning("a batch was refused (%s): finding its poison", type(exc).__name__)
                    inserted, found = await self._insert_one_by_one(entries)
                    return inserted, refused + found
                refused += [
                    _poison(entries[i], reason, message)
                    for i, (reason, message) in sorted(named.items())
                    if 0 <= i < len(entries)
                ]
                entries = [entry for i, entry in enumerate(entries) if i not in named]

    async def _insert_one_by_one(self, entries: list[Entry]) -> tuple[int, list[Poison]]:
        """The failure path for an error that names no document: each event on its own."""
        inserted = 0
        refused = []
        for entry in entries:
            try:
                inserted += await self._repository.insert_events([entry[1]])
            except Exception as exc:
                named = refused_documents(exc)
                if named:
                    reason, message = next(iter(named.values()))
                else:
                    permanent = permanent_failure(exc)
                    if permanent is None:
                        raise
                    reason, message = permanent, _describe(exc)
                refused.append(_poison(entry, reason, message))
        return inserted, refused

    def _report(self, poison: Poison) -> None:
        record = poison.record
        self._metrics.quarantined.labels(poison.reason).inc()
        # No participant (nor the event id, which holds it): the quarantine has them.
        log.error(
            "a %s %s event (seq %s, %s bytes) cannot be logged (%s: %s): set aside in quarantine",
            record.direction,
            record.channel,
            record.seq,
            poison.size,
            poison.reason,
            poison.error,
            extra=context(record.session, record.group),
        )


# A record and its MongoDB document.
Entry = tuple[LogRecord, dict[str, Any]]
# How much of a poison record's value its quarantine document keeps (of its JSON text).
QUARANTINE_VALUE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Poison:
    """A record the log cannot hold, and why."""

    record: LogRecord
    reason: str  # TOO_LARGE or INVALID: the metric's label
    error: str
    size: int | None  # bytes of its document (None: it has none)
    text: bytes | None = None  # its value's JSON text, when known


def screen(records: list[LogRecord]) -> tuple[list[Entry], list[Poison]]:
    """Each record's document, and the records that cannot have one the log accepts (no JSON
    text for the value, or over MongoDB's size limit): these never reach the server."""
    entries: list[Entry] = []
    poison: list[Poison] = []
    for record in records:
        try:
            document = event_document(record)
            size = oversize(document)
        except Exception as exc:
            poison.append(Poison(record, INVALID, _describe(exc), None))
            continue
        if size is None:
            entries.append((record, document))
        else:
            error = f"{size} bytes, over MongoDB's {MAX_DOCUMENT_BYTES} per document"
            text = document["value"].encode(errors="replace")
            poison.append(Poison(record, TOO_LARGE, error, size, text))
    return entries, poison


def quarantine_document(poison: Poison) -> dict[str, Any]:
    """What the quarantine keeps of a poison record: where it belongs, why it was refused,
    its size and the first QUARANTINE_VALUE_BYTES of its value's JSON text."""
    record = poison.record
    text = poison.text
    if text is None:
        try:
            text = orjson.dumps(record.value)
        except Exception:
            text = repr(record.value)[:QUARANTINE_VALUE_BYTES].encode(errors="replace")
    return {
        "_id": record.id,
        "ts": record.ts,
        "session": record.session,
        "group": record.group,
        "participant": record.participant,
        "direction": record.direction,
        "channel": record.channel,
        "seq": record.seq,
        "reason": poison.reason,
        "error": poison.error,
        "size": poison.size,
        "value": text[:QUARANTINE_VALUE_BYTES].decode(errors="ignore"),
        "value_truncated": len(text) > QUARANTINE_VALUE_BYTES,
        "quarantined_at": now(),
    }


def _poison(entry: Entry, reason: str, error: str) -> Poison:
    record, document = entry
    try:
        size: int | None = bson_size(document)
    except Exception:
        size = None
    text = str(document.get("value", "")).encode(errors="replace")
    return Poison(record, reason, error, size, text)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


async def _ack(batch: list[Delivery]) -> None:
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
