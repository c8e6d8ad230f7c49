"""MongoDB access of the store (PyMongo's native async client): sessions, groups, participants,
and the event log. Only what real MongoDB does: nothing specific to the local nx-27017 server."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, OperationFailure

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
# "Transaction numbers are only allowed on a replica set member or mongos": a standalone server.
ILLEGAL_OPERATION = 20

# -- documents no retry can write (poison) ------------------------------------------------------
# MongoDB refuses a document over 16 MiB; the store checks sizes itself before a batch goes
# out, so such a record never reaches the server. nx-27017 (the local MongoDB-wire server)
# differs here: it stores documents over 16 MiB (measured: 20 MiB accepted), while real MongoDB
# answers an insert of one with write error 2 BadValue "object to insert too large". Both
# refuse nothing else that the store writes (its keys are fixed; `value` is JSON text), and
# PyMongo itself refuses, client-side, only a document bigger than a whole wire message
# (48 MB: DocumentTooLarge) or one BSON cannot encode (InvalidDocument).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
TOO_LARGE = "too_large"
INVALID = "invalid"
# Server error codes that refuse the document itself, whatever the server's state: retrying
# the same document gets the same answer.
_PERMANENT_CODES = {
    2: INVALID,  # BadValue (an insert over 16 MiB is "object to insert too large": see below)
    22: INVALID,  # InvalidBSON
    52: INVALID,  # DollarPrefixedFieldName
    56: INVALID,  # EmptyFieldName
    57: INVALID,  # DottedFieldName
    121: INVALID,  # DocumentValidationFailure
    10334: TOO_LARGE,  # BSONObjectTooLarge
    17419: TOO_LARGE,  # "Resulting document after update is larger than 16777216"
    17420: TOO_LARGE,  # "Document to upsert is larger than 16777216"
}
# Labels that say the server, not the document, is the trouble (a failover, a transaction
# conflict): such an error is retried whatever its code.
_TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError", "NoWritesPerformed")


def oversize(document: dict[str, Any]) -> int | None:
    """The BSON size of `document` when it is over MongoDB's limit, None when it is under.

    Measured exactly (`bson.encode`) only when a cheap upper bound says it may be over: for a
    flat document of strings and numbers (an event), at most 4 bytes per character plus 64 per
    field. So a batch of ordinary events costs a few additions per document, not an encoding.
    """
    bound = 5
    for value in document.values():
        if isinstance(value, str):
            bound += 64 + 4 * len(value)
        elif value is None or isinstance(value, (int, float, bool)):
            bound += 64
        else:  # nested: no cheap bound
            bound = MAX_DOCUMENT_BYTES + 1
            break
    if bound <= MAX_DOCUMENT_BYTES:
        return None
    size = bson_size(document)
    return size if size > MAX_DOCUMENT_BYTES else None


def bson_size(document: dict[str, Any]) -> int:
    """The document's BSON size in bytes (raises InvalidDocument if BSON cannot hold it)."""
    return len(bson.encode(document))


def _refusal(code: Any, message: str) -> str | None:
    reason = _PERMANENT_CODES.get(code) if isinstance(code, int) else None
    if reason is not None and "too large" in message.lower():
        return TOO_LARGE
    return reason


def permanent_failure(exc: BaseException) -> str | None:
    """Why no retry can write what failed with `exc` (TOO_LARGE or INVALID), for an error that
    does not say which documents it refused; None when a retry may succeed (a connection
    error, a timeout, not-primary, anything unknown). A BulkWriteError names its documents:
    see `refused_documents`."""
    if isinstance(exc, BulkWriteError):
        return None
    if isinstance(exc, InvalidDocument):  # PyMongo's own check (DocumentTooLarge is one)
        return TOO_LARGE if "too large" in str(exc).lower() else INVALID
    if isinstance(exc, UnicodeError):  # a string BSON cannot encode (a lone surrogate)
        return INVALID
    if isinstance(exc, OperationFailure):
        if any(exc.has_error_label(label) for label in _TRANSIENT_LABELS):
            return None
        return _refusal(exc.code, str(exc))
    return None


def refused_documents(exc: BaseException) -> dict[int, tuple[str, str]] | None:
    """For a failed unordered insert: the index of each document the server refused for good,
    with the reason and its message. None when the error names no document, or when any of
    its errors may be transient (then the whole batch is retried). Duplicates are no refusal:
    the event is already in the log."""
    if not isinstance(exc, BulkWriteError):
        return None
    details = exc.details or {}
    if details.get("writeConcernErrors"):
        return None
    refused: dict[int, tuple[str, str]] = {}
    for error in details.get("writeErrors", []):
        if error.get("code") == DUPLICATE_KEY:
            continue
        message = str(error.get("errmsg", ""))
        reason = _refusal(error.get("code"), message)
        if reason is None or not isinstance(error.get("index"), int):
            return None
        refused[error["index"]] = (reason, f"{error.get('code')}: {message}"[:1000])
    return refused or None


class Repository:
    def __init__(self, url: str, database: str) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=5000
        )
        self._db = self._client[database]
        self.sessions = self._db["sessions"]
        self.groups = self._db["groups"]
        self.participants = self._db["participants"]
        self.events = self._db["events"]
        self.barriers = self._db["log_barriers"]
        # Events no retry can write (see `quarantine_events`), set aside for an operator.
        self.quarantine = self._db["quarantine"]
        self._transactions = True  # until the server says it has none (a standalone mongod)

    async def setup(self) -> None:
        await self.events.create_index([("session", ASCENDING), ("ts", ASCENDING)])
        await self.events.create_index([("group", ASCENDING), ("ts", ASCENDING)])
        await self.participants.create_index([("session", ASCENDING)])
        # A seat key names one seat (PROTOCOL v2): the gateway looks seats up by it.
        await self.participants.create_index([("key", ASCENDING)], unique=True, sparse=True)
        await self.groups.create_index([("session", ASCENDING)])

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        await self._client.admin.command("ping")

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, layout: dict[str, Any]) -> None:
        await self.groups.insert_many(layout["groups"])
        await self.participants.insert_many(layout["participants"])
        await self.sessions.insert_one(layout["session"])

    async def list_sessions(self) -> list[dict[str, Any]]:
        return [s async for s in self.sessions.find({}).sort("created_at", ASCENDING)]

    async def session(self, session_id: str) -> dict[str, Any] | None:
        return await self.sessions.find_one({"_id": session_id})

    async def session_groups(self, session_id: str) -> list[dict[str, Any]]:
        return [g async for g in self.groups.find({"session": session_id})]

    async def session_participants(self, session_id: str) -> list[dict[str, Any]]:
        cursor = self.participants.find({"session": session_id})
        return [p async for p in cursor.sort([("group", ASCENDING), ("id_in_group", ASCENDING)])]

    async def participant(self, code: str) -> dict[str, Any] | None:
        return await self.participants.find_one({"_id": code})

    async def seat(self, key: str) -> dict[str, Any] | None:
        """The participant whose seat key is `key` (PROTOCOL v2 links), if any."""
        return await self.participants.find_one({"key": key})

    async def give_seats_keys(self, mint: Callable[[], str]) -> int:
        """Sessions created before v2 have participants without a seat key (their links
        carried the code): give each one a key and a link made of it. Idempotent; how many."""
        count = 0
        async for document in self.participants.find({"key": {"$exists": False}}):
            key = mint()
            url = str(document.get("url", ""))
            prefix, sep, _ = url.rpartition("/p/")
            fields: dict[str, Any] = {"key": key}
            if sep:
                fields["url"] = f"{prefix}/p/{key}"
            result = await self.participants.update_one(
                {"_id": document["_id"], "key": {"$exists": False}}, {"$set": fields}
            )
            count += result.modified_count
        return count

    async def group(self, group_id: str) -> dict[str, Any] | None:
        return await self.groups.find_one({"_id": group_id})

    # -- the event log -----------------------------------------------------------------------

    async def insert_events(self, documents: list[dict[str, Any]]) -> int:
        """Insert a batch; documents already in the log are skipped. Returns how many were new.

        The batch is one transaction: all of it is written at once, and the server commits (and
        syncs) once per batch instead of once per event; on the local SQLite-backed server that
        cuts the bytes written per event about 13-fold (18.5 → 1.4 KB). A batch holding an event
        that is already logged (a redelivery) aborts; it is then written without a transaction,
        skipping the duplicates.
        """
        if not documents:
            return 0
        if self._transactions:
            try:
                async with (
                    self._client.start_session() as session,
                    await session.start_transaction(),
                ):
                    result = await self.events.insert_many(
                        documents, ordered=False, session=session
                    )
                return len(result.inserted_ids)
            except BulkWriteError:
                pass  # a duplicate: the transaction was aborted, nothing of it was written
            except OperationFailure as exc:
                if exc.code != ILLEGAL_OPERATION:
                    raise
                log.warning("MongoDB has no transactions (%s); writing batches without", exc)
                self._transactions = False
        return await self._insert_skipping_duplicates(documents)

    async def _insert_skipping_duplicates(self, documents: list[dict[str, Any]]) -> int:
        try:
            result = await self.events.insert_many(documents, ordered=False)
            return len(result.inserted_ids)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            others = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if others:
                raise
            return len(documents) - len(errors)

    async def quarantine_events(self, documents: list[dict[str, Any]]) -> list[str]:
        """Set aside events the log cannot hold (one document each, `_id` the event's id);
        idempotent: an event quarantined before keeps its first document. Returns the ids
        quarantined now for the first time."""
        new = []
        for document in documents:
            fields = {key: value for key, value in document.items() if key != "_id"}
            result = await self.quarantine.update_one(
                {"_id": document["_id"]}, {"$setOnInsert": fields}, upsert=True
            )
            if result.upserted_id is not None:
                new.append(str(document["_id"]))
        return new

    async def apply_status(self, updates: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        """Live status (presence, period) derived from logged events, in log order."""
        for collection, key, fields in updates:
            await self._db[collection].update_one({"_id": key}, {"$set": fields})

    async def record_barriers(self, barriers: list[str]) -> None:
        """Note log barriers as passed (idempotent: a redelivered barrier is no error)."""
        for barrier in barriers:
            await self.barriers.update_one(
                {"_id": barrier}, {"$setOnInsert": {"at": time.time()}}, upsert=True
            )

    async def barrier_passed(self, barrier: str) -> bool:
        return await self.barriers.find_one({"_id": barrier}) is not None

    async def group_events(
        self, group_id: str, *, batch_size: int = 2000
    ) -> AsyncIterator[dict[str, Any]]:
        """A group's log in its one order (decisions stamps strictly increasing `ts` per group)."""
        cursor = self.events.find({"group": group_id}, batch_size=batch_size)
        async for document in cursor.sort([("ts", ASCENDING)]):
            yield document

    async def session_events(
        self, session_id: str, *, batch_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        cursor = self.events.find({"session": session_id}, batch_size=batch_size)
        async for document in cursor.sort([("ts", ASCENDING), ("seq", ASCENDING)]):
            yield document
