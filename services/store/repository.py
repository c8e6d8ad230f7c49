"""MongoDB access of the store (PyMongo's native async client): sessions, groups, participants,
and the event log. Only what real MongoDB does: nothing specific to the local nx-27017 server."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

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


# Sessions whose study link was opened, remembered (`session_by_join_key`); beyond it the
# oldest is asked again: a few KiB each, and only live studies are being joined.
JOIN_KEYS_REMEMBERED = 1024


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
        # The study link's labels (PROTOCOL v2 "Online studies"): `_id` "<session>:<label>",
        # `participant` the seat that label has. The unique `_id` is what gives a label one
        # seat, also when two gateways bring the same label at the same moment.
        self.study_labels = self._db["study_labels"]
        # Events no retry can write (see `quarantine_events`), set aside for an operator.
        self.quarantine = self._db["quarantine"]
        self._transactions = True  # until the server says it has none (a standalone mongod)
        self._join_keys: dict[str, dict[str, Any]] = {}  # join key → its session document

    async def setup(self) -> None:
        await self.events.create_index([("session", ASCENDING), ("ts", ASCENDING)])
        await self.events.create_index([("group", ASCENDING), ("ts", ASCENDING)])
        await self.participants.create_index([("session", ASCENDING)])
        # A seat key names one seat (PROTOCOL v2): the gateway looks seats up by it.
        await self.participants.create_index([("key", ASCENDING)], unique=True, sparse=True)
        await self.groups.create_index([("session", ASCENDING)])
        # The study link names its session by join key; seats are taken in seat order.
        await self.sessions.create_index([("join_key", ASCENDING)], unique=True, sparse=True)
        await self.participants.create_index([("session", ASCENDING), ("seat", ASCENDING)])
        # The study link finds a label's seat by it (`claim_labelled_seat`), on every arrival.
        await self.participants.create_index([("session", ASCENDING), ("label", ASCENDING)])

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        await self._client.admin.command("ping")

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, layout: dict[str, Any]) -> None:
        # `seat`: the participant's place in group order (the session's groups in order, then
        # id_in_group), the order the study link gives seats in and the payments file lists
        # them in (group ids are random: sorting by them is no order).
        participants = [{**p, "seat": i} for i, p in enumerate(layout["participants"])]
        await self.groups.insert_many(layout["groups"])
        await self.participants.insert_many(participants)
        await self.sessions.insert_one(layout["session"])

    async def list_sessions(self) -> list[dict[str, Any]]:
        return [s async for s in self.sessions.find({}).sort("created_at", ASCENDING)]

    async def session(self, session_id: str) -> dict[str, Any] | None:
        return await self.sessions.find_one({"_id": session_id})

    async def session_groups(self, session_id: str) -> list[dict[str, Any]]:
        return [g async for g in self.groups.find({"session": session_id})]

    async def session_participants(self, session_id: str) -> list[dict[str, Any]]:
        """A session's participants in seat order (sessions older than `seat`: by group)."""
        cursor = self.participants.find({"session": session_id})
        order = [("seat", ASCENDING), ("group", ASCENDING), ("id_in_group", ASCENDING)]
        return [p async for p in cursor.sort(order)]

    async def group_labels(self, session_id: str, group_id: str) -> dict[str, str]:
        """The labels a group's members have now (code → label; the study link adds them)."""
        cursor = self.participants.find(
            {"session": session_id, "group": group_id, "label": {"$exists": True}},
            projection={"label": True},
        )
        return {str(p["_id"]): str(p["label"]) async for p in cursor}

    async def session_by_join_key(self, join_key: str) -> dict[str, Any] | None:
        """The session whose study link this is. Cached: every arrival of a launch asks, and
        a session document is written once and never changed (nothing updates or deletes
        `sessions`), so a session found stays right; an unknown key is asked again (its
        session may be created later)."""
        cached = self._join_keys.get(join_key)
        if cached is not None:
            return cached
        session = await self.sessions.find_one({"join_key": join_key})
        if session is not None:
            if len(self._join_keys) >= JOIN_KEYS_REMEMBERED:
                self._join_keys.pop(next(iter(self._join_keys)))  # the oldest
            self._join_keys[join_key] = session
        return session

    # -- the study link (PROTOCOL v2 "Online studies") ----------------------------------------
    #
    # A label's seat is decided by the `study_labels` document of "<session>:<label>": the
    # first insert wins, a duplicate key means another caller (another gateway, another
    # store replica) gave that label a seat a moment ago, and its seat is the one. A seat is
    # claimed with one `find_one_and_update` on `taken` (or on `label`, for a label given in
    # `labels`), so two callers never claim the same free seat. The order (claim, then
    # insert the label's document) makes every crash harmless: a seat claimed for a label
    # whose document never got written carries that label, and the next call with that label
    # finds it by label again.

    async def join(
        self, session_id: str, label: str | None, seat_key: str | None
    ) -> dict[str, Any] | None:
        """The seat the study link gives: by `label` (its seat from before, the seat listed
        for it in `labels`, else the first free seat), or without a label the seat of the
        browser's cookie (`seat_key`) when it is one of this session's, else the first free
        seat. None: no seat left (the session is full)."""
        if label is None:
            if seat_key:
                seat = await self.seat(seat_key)
                if seat is not None and seat.get("session") == session_id:
                    if not seat.get("taken"):
                        await self.take_seat(seat["_id"])
                    return seat
            return await self.claim_free_seat(session_id)
        seat = await self.label_seat(session_id, label)
        if seat is not None:
            return seat
        fresh = False
        seat = await self.claim_labelled_seat(session_id, label)
        if seat is None:
            seat = await self.claim_free_seat(session_id, label)
            fresh = True
        if seat is None:
            return None
        code = await self.record_label(session_id, label, seat["_id"])
        if code == seat["_id"]:
            return seat
        if fresh:  # another caller gave this label its seat first: ours goes back
            await self.release_seat(seat["_id"], label)
        return await self.participants.find_one({"_id": code})

    async def label_seat(self, session_id: str, label: str) -> dict[str, Any] | None:
        """The seat `label` has in the session (given by the study link before), if any."""
        mapping = await self.study_labels.find_one({"_id": f"{session_id}:{label}"})
        if mapping is None:
            return None
        return await self.participants.find_one({"_id": mapping["participant"]})

    async def claim_labelled_seat(self, session_id: str, label: str) -> dict[str, Any] | None:
        """The seat that carries `label` already (listed in `labels`, or claimed for it by a
        call that did not finish), now marked taken."""
        return await self.participants.find_one_and_update(
            {"session": session_id, "label": label},
            {"$set": {"taken": True}},
            return_document=ReturnDocument.AFTER,
        )

    async def claim_free_seat(
        self, session_id: str, label: str | None = None, *, bot: bool = False
    ) -> dict[str, Any] | None:
        """The first free seat in seat order (no label, not taken), taken now and labelled
        `label` when one is given (`bot`: for a bot the lobby seats); None when the session
        has no free seat left."""
        fields: dict[str, Any] = {"taken": True}
        if label is not None:
            fields["label"] = label
        if bot:
            fields["bot"] = True
        # `taken` false or absent: `$in` [false, null], not `$ne: true`, which nx-27017 (the
        # local MongoDB-wire server) does not match against a document without the field in
        # an update or findAndModify (its finds do; real MongoDB matches it in all of them).
        return await self.participants.find_one_and_update(
            {"session": session_id, "label": {"$exists": False}, "taken": {"$in": [False, None]}},
            {"$set": fields},
            sort=[("seat", ASCENDING), ("group", ASCENDING), ("id_in_group", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    async def record_label(self, session_id: str, label: str, code: str) -> str:
        """Give `label` the seat `code` unless another caller gave it one first; the seat
        the label has now (`code`, or the other caller's)."""
        key = f"{session_id}:{label}"
        try:
            await self.study_labels.insert_one({"_id": key, "participant": code})
            return code
        except DuplicateKeyError:
            existing = await self.study_labels.find_one({"_id": key})
            if existing is None:  # cannot be: a document with that _id refused ours
                raise
            return str(existing["participant"])

    async def release_seat(self, code: str, label: str) -> None:
        """Give back a seat claimed for `label` that another caller's seat won."""
        await self.participants.update_one(
            {"_id": code, "label": label}, {"$unset": {"label": ""}, "$set": {"taken": False}}
        )

    async def take_seat(self, code: str) -> None:
        """Mark a seat taken (one a label-less browser comes back to with its cookie)."""
        await self.participants.update_one({"_id": code}, {"$set": {"taken": True}})

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

    # -- the lobby (PROTOCOL v2 "The lobby") ---------------------------------------------------

    async def form_group(
        self, session_id: str, group_id: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]] | None:
        """Form an arrival session's group with `members` and `bots` free seats that bots
        play (after the members), unless it was formed already: the members it has and which
        of them bots play. The group document decides: only an update of a group not `formed`
        yet succeeds, so a group is formed once, whoever asks and however often. The seats
        are given their group after it (again on a repeated call: a worker that died between
        the two finishes it when it asks again). None: no such group, or not enough free
        seats for the bots (those claimed go back)."""
        claimed: list[str] = []
        existing: dict[str, Any] | None = None
        if bots:  # seats for the bots first, unless the group was formed already
            existing = await self.groups.find_one({"_id": group_id, "session": session_id})
            if existing is None:
                return None
        if existing is not None and not existing.get("formed", True):
            for _ in range(bots):
                seat = await self.claim_free_seat(session_id, bot=True)
                if seat is None:
                    await self._unclaim(claimed)
                    return None
                claimed.append(str(seat["_id"]))
        # `formed` false, not `members: []`: nx-27017 does not match an empty array that way.
        document = await self.groups.find_one_and_update(
            {"_id": group_id, "session": session_id, "formed": False},
            {
                "$set": {
                    "members": members + claimed,
                    "bots": claimed,
                    "formed": True,
                    "formed_at": time.time(),
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        if document is None:  # formed by an earlier call: its members stand
            await self._unclaim(claimed)
            document = await self.groups.find_one({"_id": group_id, "session": session_id})
            if document is None:
                return None
        formed = [str(code) for code in document["members"]]
        # One round trip for the seats (the lobby waits for this call: a launch of 1,000
        # people in 10 s forms 25 groups a second through it).
        await self.participants.bulk_write(
            [
                UpdateOne(
                    {"_id": code, "session": session_id},
                    {"$set": {"group": group_id, "id_in_group": index}},
                )
                for index, code in enumerate(formed, start=1)
            ],
            ordered=False,
        )
        return formed, [str(code) for code in document.get("bots") or []]

    async def _unclaim(self, codes: list[str]) -> None:
        """Give back free seats claimed for bots of a group that was not formed with them."""
        for code in codes:
            await self.participants.update_one(
                {"_id": code}, {"$set": {"taken": False}, "$unset": {"bot": ""}}
            )

    async def session_labels(self, session_id: str) -> dict[str, str]:
        """Every label a session's seats have now (code → label)."""
        cursor = self.participants.find(
            {"session": session_id, "label": {"$exists": True}}, projection={"label": True}
        )
        return {str(p["_id"]): str(p["label"]) async for p in cursor}

    async def lobby_events(
        self, session_id: str, *, batch_size: int = 2000
    ) -> AsyncIterator[dict[str, Any]]:
        """A session's lobby log (its rows have the group "") in its order."""
        cursor = self.events.find({"session": session_id, "group": ""}, batch_size=batch_size)
        async for document in cursor.sort([("ts", ASCENDING)]):
            yield document

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
