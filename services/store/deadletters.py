"""Dead letters: the messages a consumer gave up on, kept where an operator sees them, and sent
back on request.

A message reaches `canopy.dead` when its consumer rejected it because no retry could ever
succeed (a body that is no envelope or log batch, or one of a newer major version: see
`services.common.messages` "Versions"), or, on a queue an older Canopy declared, after its
delivery limit (`services.common.bus` "Dead letters, queue by queue"). Before, nothing read
that queue: a dead letter was silent loss. `DeadLetterKeeper` consumes it in the store and

- keeps each dead letter in the `dead_letters` collection: its body, AMQP properties and
  headers (`x-death`: the queue it died in, why, when, the exchange and routing key it came
  by), a `cause` in words, and when it was kept;
- counts it in `canopy_store_dead_letters_total{queue, reason}` (alert `CanopyDeadLetters`)
  and logs it as an ERROR;
- acks it only once MongoDB holds it: while MongoDB is away, dead letters wait in their queue.

`redrive(id)` publishes a kept dead letter again, with confirms and `mandatory`, to the
exchange and routing key it first died from, and marks it `redriven`: for once its reason is
gone (every reader upgraded, a bug fixed). `GET /api/dead-letters`,
`POST /api/dead-letters/{id}/redrive` and `canopy dead-letters list|redrive` are its faces.
A redriven message that dies again comes back as a new dead letter: the header
`x-canopy-redrive` (its dead letter's id and the redrive's number) keeps the two apart.

A dead letter's id is a hash of its body and headers (but `x-delivery-count`, which
`canopy.dead` itself adds), so one the broker delivers twice (the store's channel died before
its ack) is kept once.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from prometheus_client import CollectorRegistry, Counter
from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

from services.common.bus import DEFAULT, STORE_QUEUE, TIMERS_QUEUE, Bus, decode_message
from services.common.messages import SCHEMA_VERSION, LogBatch, now
from services.common.retry import retry_forever

log = logging.getLogger(__name__)

COLLECTION = "dead_letters"
REDRIVE_HEADER = "x-canopy-redrive"
# A body bigger than this (MongoDB takes 16 MiB per document) is kept cut, and cannot be
# redriven. Canopy's own messages stay under 4 MiB (bus.BATCH_MAX_BYTES, the log's batches).
MAX_BODY_BYTES = 15 * 1024 * 1024
CUT_BODY_BYTES = 64 * 1024
# What a listing shows of each body (the whole one is in MongoDB).
LISTED_BODY_CHARS = 4096
PER_DELIVERY_HEADERS = ("x-delivery-count",)
REASONS = ("rejected", "delivery_limit", "expired", "maxlen")
DEAD_STATE, REDRIVEN_STATE = "dead", "redriven"


class NotRedrivable(Exception):
    """A kept dead letter that cannot be published again as it was (no exchange, cut body)."""


def _plain(value: Any) -> Any:
    """A header value as JSON and BSON both hold it (x-death's time is a datetime)."""
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _first_death(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The `x-death` entry of the queue the message first died in (RabbitMQ adds one per
    queue and reason, newest first; `x-first-death-*` name the first)."""
    deaths = [d for d in headers.get("x-death") or [] if isinstance(d, Mapping)]
    queue = headers.get("x-first-death-queue")
    for death in deaths:
        if death.get("queue") == queue:
            return dict(death)
    return dict(deaths[-1]) if deaths else {}


def _newer_version(body: bytes) -> int | None:
    """The version of a body's envelopes (or log batch) when it is above this reader's."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    versions = [
        item["version"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("version"), int)
    ]
    newest = max(versions, default=0)
    return newest if newest > SCHEMA_VERSION else None


def cause(message: AbstractIncomingMessage, queue: str | None, reason: str | None) -> str:
    """Why the message died, in words, as far as this reader can tell."""
    if reason == "rejected":
        version = _newer_version(message.body)
        if version is not None:
            return (
                f"version {version} is newer than this reader's ({SCHEMA_VERSION}): refused "
                "unread; redrive it once every reader knows that version"
            )
        try:
            if queue == STORE_QUEUE:
                LogBatch.decode(message.body)
            else:
                decode_message(message)
        except ValueError as exc:
            return f"malformed: {' '.join(str(exc).split())[:500]}"
        return "rejected by its consumer (it reads as valid here)"
    if reason == "delivery_limit":
        return "delivered more often than its queue's delivery limit (a consumer that kept failing)"
    if reason == "expired":
        return "expired in its queue"
    if reason == "maxlen":
        return "its queue was full"
    return f"dead-lettered ({reason or 'no reason given'})"


def dead_letter_document(message: AbstractIncomingMessage, kept_at: float) -> dict[str, Any]:
    """What the collection keeps of a dead letter (`_id`: a hash of body and headers)."""
    headers = _plain(dict(message.headers or {}))
    death = _first_death(headers)
    queue = headers.get("x-first-death-queue") or death.get("queue")
    reason = headers.get("x-first-death-reason") or death.get("reason")
    routing_keys = death.get("routing-keys") or []
    body = message.body
    digest = hashlib.sha256(body)
    # Not what the dead-letter queue adds to each delivery (a quorum queue counts them).
    stable = {key: value for key, value in headers.items() if key not in PER_DELIVERY_HEADERS}
    digest.update(orjson.dumps(stable, option=orjson.OPT_SORT_KEYS))
    cut = len(body) > MAX_BODY_BYTES
    return {
        "_id": digest.hexdigest()[:32],
        "kept_at": kept_at,
        "state": DEAD_STATE,
        "queue": queue,
        "reason": reason,
        "cause": cause(message, queue, reason),
        "exchange": headers.get("x-first-death-exchange", death.get("exchange")),
        "routing_key": routing_keys[0] if routing_keys else None,
        "died_at": death.get("time"),
        "count": death.get("count"),
        "message_id": message.message_id,
        "type": message.type,
        "content_type": message.content_type,
        "headers": headers,
        "body": body[:CUT_BODY_BYTES] if cut else body,
        "body_bytes": len(body),
        "body_cut": cut,
        "redrives": 0,
        "redriven_at": None,
    }


def public(document: Mapping[str, Any], *, body_chars: int = LISTED_BODY_CHARS) -> dict[str, Any]:
    """A kept dead letter as the API shows it: the body as text, cut to `body_chars`."""
    shown = {key: value for key, value in document.items() if key not in ("_id", "body")}
    text = bytes(document.get("body") or b"").decode(errors="replace")
    return {"id": document["_id"], **shown, "body": text[:body_chars]}


class DeadLetterKeeper:
    """Consumes `canopy.dead` into the `dead_letters` collection; redrives on request."""

    def __init__(
        self, collection: AsyncCollection[dict[str, Any]], bus: Bus, registry: CollectorRegistry
    ) -> None:
        self._collection = collection
        self._bus = bus
        self._channel: AbstractChannel | None = None
        self.kept = Counter(
            "canopy_store_dead_letters",
            "Dead letters kept (messages a consumer gave up on), by the queue they died in and "
            "why (rejected, delivery_limit, expired, maxlen); docs/operations.md 'Dead letters'",
            ["queue", "reason"],
            registry=registry,
        )
        # Series at 0 from the start, so that the metric exists before the first dead letter
        # (a rule or a dashboard reading it finds it; an increase from 0 is seen as one).
        for queue in (STORE_QUEUE, TIMERS_QUEUE):
            self.kept.labels(queue, "rejected")

    def _labels(self, document: Mapping[str, Any]) -> tuple[str, str]:
        # Bounded values only: Canopy's own queues (shards are bounded by CANOPY_SHARDS).
        queue = str(document.get("queue") or "")
        known = queue in (STORE_QUEUE, TIMERS_QUEUE) or queue.startswith("canopy.decisions.")
        reason = str(document.get("reason") or "")
        return (queue if known else "other", reason if reason in REASONS else "other")

    async def setup(self) -> None:
        await self._collection.create_index([("kept_at", DESCENDING)])

    async def run(self, queue: AbstractQueue) -> None:
        """Keep every message of `queue` (canopy.dead), one at a time, acked once kept."""
        async with queue.iterator() as messages:
            async for message in messages:
                await self.keep(message)

    async def keep(self, message: AbstractIncomingMessage) -> None:
        document = dead_letter_document(message, now())
        inserted = False

        async def write() -> None:
            nonlocal inserted
            fields = {key: value for key, value in document.items() if key != "_id"}
            result = await self._collection.update_one(
                {"_id": document["_id"]}, {"$setOnInsert": fields}, upsert=True
            )
            inserted = result.upserted_id is not None

        # Held (unacked) while MongoDB is away: the dead letter stays in its queue meanwhile.
        await retry_forever(write, "keeping a dead letter", first_delay=0.1, max_delay=5.0)
        if inserted:
            self.kept.labels(*self._labels(document)).inc()
            log.error(
                "dead letter %s from %s (%s): %s; kept in %s",
                document["_id"],
                document["queue"],
                document["reason"],
                document["cause"],
                COLLECTION,
            )
        try:
            await message.ack()
        except (ChannelInvalidStateError, AMQPError) as exc:
            log.info("ack of a dead letter lost with its channel (%r): kept once anyway", exc)

    async def summary(self) -> dict[str, int]:
        return {
            "total": await self._collection.count_documents({}),
            "dead": await self._collection.count_documents({"state": DEAD_STATE}),
        }

    async def list(self, *, limit: int, state: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        query = {} if state is None else {"state": state}
        cursor = self._collection.find(query).sort("kept_at", DESCENDING).limit(limit)
        return [public(document) async for document in cursor]

    async def redrive(self, dead_letter_id: str) -> dict[str, Any] | None:
        """Publish a kept dead letter again where it first came from; None if unknown.
        Raises NotRedrivable, or the bus's error when the broker did not take it."""
        document = await self._collection.find_one({"_id": dead_letter_id})
        if document is None:
            return None
        exchange_name = document.get("exchange")
        if document.get("body_cut") or exchange_name is None or document.get("routing_key") is None:
            raise NotRedrivable("no exchange and routing key, or its body was cut when kept")
        channel = await self._publish_channel()
        if exchange_name == DEFAULT:
            exchange = channel.default_exchange
        else:
            exchange = await channel.get_exchange(exchange_name, ensure=False)
        number = int(document.get("redrives") or 0) + 1
        await exchange.publish(
            aio_pika.Message(
                bytes(document["body"]),
                message_id=document.get("message_id"),
                type=document.get("type"),
                content_type=document.get("content_type"),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={REDRIVE_HEADER: f"{dead_letter_id}:{number}"},
            ),
            routing_key=document["routing_key"],
            mandatory=True,
        )
        log.warning(
            "dead letter %s redriven to %r with key %r (redrive %d)",
            dead_letter_id,
            exchange_name,
            document["routing_key"],
            number,
        )
        updated = await self._collection.find_one_and_update(
            {"_id": dead_letter_id},
            {"$set": {"state": REDRIVEN_STATE, "redriven_at": now()}, "$inc": {"redrives": 1}},
            return_document=ReturnDocument.AFTER,
        )
        return public(updated) if updated is not None else None

    async def _publish_channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._bus.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        return self._channel
