"""Poison records in the store's event writer: what no retry can write is set aside in the
quarantine, the rest of its batch is written and acked, and only transient errors are retried.

The fake repository answers as real MongoDB does (an unordered insert writes every document it
can and names the others in a BulkWriteError; a document over 16 MiB is write error 2, "object
to insert too large"). tests/integration/test_store_poison.py runs the same against nx-27017.
"""

from __future__ import annotations

import asyncio
from typing import Any

import bson
import pytest
from bson.errors import InvalidDocument
from pymongo.errors import AutoReconnect, BulkWriteError, NetworkTimeout, OperationFailure

from services.common.messages import LogBatch, LogRecord
from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from services.store.repository import (
    INVALID,
    MAX_DOCUMENT_BYTES,
    TOO_LARGE,
    oversize,
    permanent_failure,
    refused_documents,
)
from tests.unit.test_store_writer import Channel, Message, _Queue

REFUSED = "refused by a validator"  # a value the fake server refuses (DocumentValidationFailure)
HOPELESS = "BSON cannot encode this"  # a value the fake client refuses for a whole batch


def record(n: int, value: Any = 0.5, channel: str = "decisions") -> LogRecord:
    return LogRecord(
        id=f"e{n}",
        ts=float(n),
        session="s",
        group="g",
        participant="p",
        direction="out",
        channel=channel,
        seq=n,
        value=value,
    )


class MongoLike:
    """The store's repository (duplicates skipped) on a server that behaves like MongoDB."""

    def __init__(self, transient_failures: int = 0) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.quarantine: dict[str, dict[str, Any]] = {}
        self.status: list[Any] = []
        self.inserts: list[list[str]] = []  # the ids of each insert_events call
        self.transient_failures = transient_failures

    async def insert_events(self, documents: list[dict[str, Any]]) -> int:
        self.inserts.append([d["_id"] for d in documents])
        if self.transient_failures:
            self.transient_failures -= 1
            raise AutoReconnect("connection closed")
        if any(HOPELESS in d["value"] for d in documents):
            raise InvalidDocument("cannot encode object: " + HOPELESS)
        errors, inserted = [], 0
        for index, document in enumerate(documents):
            if document["_id"] in self.events:
                errors.append({"index": index, "code": 11000, "errmsg": "E11000 duplicate key"})
            elif len(bson.encode(document)) > MAX_DOCUMENT_BYTES:
                errors.append({"index": index, "code": 2, "errmsg": "object to insert too large"})
            elif REFUSED in document["value"]:
                errors.append({"index": index, "code": 121, "errmsg": "Document failed validation"})
            else:
                self.events[document["_id"]] = document
                inserted += 1
        # As `Repository.insert_events`: duplicates alone are no error (a redelivery).
        if any(e["code"] != 11000 for e in errors):
            raise BulkWriteError({"writeErrors": errors, "nInserted": inserted})
        return inserted

    async def quarantine_events(self, documents: list[dict[str, Any]]) -> list[str]:
        new = [d["_id"] for d in documents if d["_id"] not in self.quarantine]
        for document in documents:
            self.quarantine.setdefault(document["_id"], document)
        return new

    async def apply_status(self, updates: Any) -> None:
        self.status.extend(updates)

    async def record_barriers(self, barriers: list[str]) -> None:
        pass


async def write(
    repository: MongoLike, *batches: list[LogRecord], metrics: StoreMetrics | None = None
) -> list[Message]:
    """Feed the batches to a running writer; return once the last one is acked (or fail)."""
    writer = EventWriter(
        repository,  # type: ignore[arg-type]
        metrics or StoreMetrics(),
        batch_size=1000,
        batch_seconds=0.01,
    )
    channel = Channel()
    messages = [
        Message(LogBatch(records=records), tag, channel)
        for tag, records in enumerate(batches, start=1)
    ]
    for message in messages:
        await writer.on_message(message)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run(_Queue()))  # type: ignore[arg-type]
    try:
        # Before the fix the writer retried the batch forever: nothing was ever acked.
        await asyncio.wait_for(messages[-1].acked.wait(), 10)
    finally:
        task.cancel()
    return messages


def quarantined(metrics: StoreMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("canopy_store_quarantined_total", {"reason": reason})


async def test_an_oversize_record_is_quarantined_and_never_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    repository, metrics = MongoLike(), StoreMetrics()
    big = "x" * (MAX_DOCUMENT_BYTES + 1)
    records = [record(1), record(2, {"book": big}), record(3)]
    await write(repository, records, metrics=metrics)
    assert sorted(repository.events) == ["e1", "e3"]
    assert all("e2" not in ids for ids in repository.inserts)  # caught before the insert
    [entry] = repository.quarantine.values()
    assert entry["_id"] == "e2" and entry["reason"] == TOO_LARGE
    where = (entry["session"], entry["group"], entry["channel"], entry["seq"])
    assert where == ("s", "g", "decisions", 2)
    assert entry["size"] > MAX_DOCUMENT_BYTES
    assert entry["value"] == ('{"book":"' + big)[: 64 * 1024] and entry["value_truncated"]
    assert quarantined(metrics, TOO_LARGE) == 1 and quarantined(metrics, INVALID) == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "quarantine" in errors[0].getMessage()
    assert "p" not in {getattr(errors[0], "participant", None)}  # no participant in the log


async def test_documents_the_server_refuses_are_split_out_of_the_batch() -> None:
    repository, metrics = MongoLike(), StoreMetrics()
    records = [record(1), record(2, REFUSED), record(3), record(4, REFUSED), record(5)]
    await write(repository, records, metrics=metrics)
    assert sorted(repository.events) == ["e1", "e3", "e5"]
    assert sorted(repository.quarantine) == ["e2", "e4"]
    assert repository.quarantine["e2"]["reason"] == INVALID
    assert "121" in repository.quarantine["e2"]["error"]
    assert quarantined(metrics, INVALID) == 2
    # The refusal cost one more insert of the rest (duplicates by then), not one per event.
    assert len(repository.inserts) == 2


async def test_an_error_naming_no_document_is_narrowed_down_one_by_one() -> None:
    repository, metrics = MongoLike(), StoreMetrics()
    records = [record(1), record(2, HOPELESS), record(3)]
    await write(repository, records, metrics=metrics)
    assert sorted(repository.events) == ["e1", "e3"]
    assert list(repository.quarantine) == ["e2"]
    assert repository.quarantine["e2"]["error"].startswith("InvalidDocument")
    assert quarantined(metrics, INVALID) == 1


async def test_a_poison_record_changes_no_status_and_is_reported_once() -> None:
    repository, metrics = MongoLike(transient_failures=2), StoreMetrics()
    end = {"period": 1, "group_decisions": {}, "payoffs": {"p": 1.0}, "pad": REFUSED}
    records = [record(1), record(2, end, channel="period_end")]
    await write(repository, records, metrics=metrics)
    await write(repository, records, metrics=metrics)  # redelivered (an ack that was lost)
    assert list(repository.quarantine) == ["e2"]
    assert repository.status == []  # the period's end is not in the log: no payoffs from it
    assert quarantined(metrics, INVALID) == 1


async def test_transient_failures_are_still_retried_until_they_pass() -> None:
    repository, metrics = MongoLike(transient_failures=3), StoreMetrics()
    await write(repository, [record(1), record(2)], metrics=metrics)
    assert sorted(repository.events) == ["e1", "e2"] and repository.quarantine == {}
    assert metrics.registry.get_sample_value("canopy_store_batch_failures_total") == 3


def bulk(*errors: dict[str, Any], **details: Any) -> BulkWriteError:
    return BulkWriteError({"writeErrors": list(errors), **details})


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (AutoReconnect("connection reset"), None),
        (NetworkTimeout("timed out"), None),
        (ConnectionError("refused"), None),
        (OperationFailure("not primary", 10107), None),
        (OperationFailure("interrupted at shutdown", 11600), None),
        (OperationFailure("an unknown failure", 999999), None),
        (
            OperationFailure(
                "write conflict", 2, {"errorLabels": ["TransientTransactionError"], "code": 2}
            ),
            None,
        ),
        (InvalidDocument("key 'a\x00' must not contain NUL"), INVALID),
        (UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"), INVALID),
        (OperationFailure("BSONObj size: 17000000 is invalid", 10334), TOO_LARGE),
        (OperationFailure("object to insert too large", 2), TOO_LARGE),
        (OperationFailure("Document failed validation", 121), INVALID),
        (bulk({"index": 0, "code": 2, "errmsg": "object to insert too large"}), None),
    ],
)
def test_permanent_failures_are_told_from_transient_ones(
    error: BaseException, reason: str | None
) -> None:
    assert permanent_failure(error) == reason


def test_write_errors_name_the_refused_documents() -> None:
    too_large = {"index": 3, "code": 2, "errmsg": "object to insert too large. size in bytes: 1"}
    duplicate = {"index": 1, "code": 11000, "errmsg": "E11000 duplicate key"}
    dotted = {"index": 4, "code": 57, "errmsg": "field names may not contain '.'"}
    refused = refused_documents(bulk(too_large, duplicate, dotted))
    assert refused is not None
    assert {i: reason for i, (reason, _) in refused.items()} == {3: TOO_LARGE, 4: INVALID}
    # Duplicates only, an unknown code, or a write concern error: nothing is poison.
    assert refused_documents(bulk(duplicate)) is None
    shutdown = {"index": 2, "code": 91, "errmsg": "shutdown in progress"}
    assert refused_documents(bulk(too_large, shutdown)) is None
    assert refused_documents(bulk(too_large, writeConcernErrors=[{"code": 64}])) is None
    assert refused_documents(AutoReconnect("x")) is None


def test_the_size_check_measures_only_documents_that_may_be_too_large() -> None:
    small = {"_id": "e1", "seq": 1, "ts": 1.0, "participant": None, "value": "x" * 1000}
    assert oversize(small) is None
    # Near the limit the cheap bound says "maybe": the exact size decides.
    near = {"_id": "e2", "value": "x" * (MAX_DOCUMENT_BYTES // 4 + 1)}
    assert oversize(near) is None
    over = {"_id": "e3", "value": "é" * (MAX_DOCUMENT_BYTES // 2)}  # 2 bytes per character
    assert oversize(over) == len(bson.encode(over)) > MAX_DOCUMENT_BYTES
