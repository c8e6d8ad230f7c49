"""`LogWriter` cuts log batches by bytes as well as by count, and an input whose records span
two batches is confirmed only when both are; against a stand-in for the broker whose confirms
the test releases by hand (as tests/unit/test_batcher.py does for `Batcher`)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.common.bus import Bus
from services.common.messages import LogBatch, LogRecord
from services.decisions.log import DEFAULT_MAX_BYTES, LogWriter, record_size


class HeldBroker:
    """Records each published `LogBatch` with its encoded size; holds each confirm."""

    def __init__(self) -> None:
        self.batches: list[LogBatch] = []
        self.sizes: list[int] = []
        self.confirms: list[asyncio.Future[None]] = []
        self.published = asyncio.Event()

    async def publish_reliably(self, exchange: str, key: str, batch: LogBatch, **_: Any) -> None:
        confirm = asyncio.get_running_loop().create_future()
        self.batches.append(batch)
        self.sizes.append(len(batch.encode()))
        self.confirms.append(confirm)
        self.published.set()
        await confirm

    async def wait_batches(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.batches) < count:
                self.published.clear()
                await self.published.wait()


def record(n: int, value_bytes: int, participant: str = "p") -> LogRecord:
    return LogRecord(
        id=f"out:{n}",
        ts=1_765_000_000.123456 + n,
        session="s" * 12,
        group="g1",
        participant=participant,
        direction="out",
        channel="book",
        seq=n,
        value={"bids": ["x" * value_bytes], "price": 1 / 3},
    )


def writer(broker: HeldBroker, **options: Any) -> LogWriter:
    return LogWriter(cast(Bus, broker), interval=0.01, max_records=options.pop("max_records", 1000),
                     **options)  # fmt: skip


def test_the_size_estimate_covers_the_encoded_record() -> None:
    for size in (0, 10, 1000, 200_000):
        r = record(7, size)
        encoded = len(LogRecord.__pydantic_serializer__.to_json(r))
        assert encoded <= record_size(r) <= encoded + 200


async def test_many_big_records_leave_in_batches_under_the_default_budget() -> None:
    broker = HeldBroker()
    log = writer(broker)
    # 40 rows of 200 KB (under the 256 KiB row cap): 8 MB in all, far fewer than max_records.
    written = [log.add([record(n, 200_000)]) for n in range(40)]
    await broker.wait_batches(2)  # one cut by size, then the interval's
    assert sum(len(b.records) for b in broker.batches) == 40
    assert max(broker.sizes) <= DEFAULT_MAX_BYTES
    for confirm in broker.confirms:
        confirm.set_result(None)
    await asyncio.wait_for(asyncio.gather(*written), 5)


async def test_an_input_whose_records_span_two_batches_waits_for_both() -> None:
    broker = HeldBroker()
    log = writer(broker, max_bytes=100_000)
    first = log.add([record(1, 20_000)])
    # Together more than a batch holds: the first fills the batch, the second goes next.
    spanning = log.add([record(2, 60_000), record(3, 60_000)])
    await broker.wait_batches(1)
    assert [r.id for r in broker.batches[0].records] == ["out:1", "out:2"]
    broker.confirms[0].set_result(None)
    await asyncio.wait_for(first, 5)
    await asyncio.sleep(0)
    assert not spanning.done(), "its second record is not confirmed yet"
    await broker.wait_batches(2)  # the interval's flush
    assert [r.id for r in broker.batches[1].records] == ["out:3"]
    broker.confirms[1].set_result(None)
    await asyncio.wait_for(spanning, 5)
    assert all(size <= 100_000 for size in broker.sizes)


async def test_one_inputs_records_are_never_split_when_they_fit_in_a_batch() -> None:
    """A `period_end` and its `finished` rows leave in one batch: split, a crash between the
    two publishes would log `period_end` alone, and the redelivered tick, seen as applied,
    would never send the `finished` rows (by count and by bytes)."""
    broker = HeldBroker()
    log = writer(broker, max_records=4)
    earlier = log.add([record(1, 10), record(2, 10)])
    end = log.add([record(3, 10), record(4, 10, "a"), record(5, 10, "b")])  # 5 > 4 records
    by_bytes = writer(broker, max_bytes=100_000)
    before = by_bytes.add([record(6, 50_000)])
    ending = by_bytes.add([record(7, 30_000), record(8, 30_000)])  # only a new batch holds both
    log.flush()
    by_bytes.flush()
    await broker.wait_batches(4)
    assert sorted([r.id for r in b.records] for b in broker.batches) == [
        ["out:1", "out:2"],
        ["out:3", "out:4", "out:5"],
        ["out:6"],
        ["out:7", "out:8"],
    ]
    for confirm in broker.confirms:
        confirm.set_result(None)
    await asyncio.wait_for(asyncio.gather(earlier, end, before, ending), 5)


async def test_a_failed_batch_fails_every_input_with_records_in_it() -> None:
    broker = HeldBroker()
    log = writer(broker, max_bytes=100_000)
    spanning = log.add([record(1, 60_000), record(2, 60_000)])
    await broker.wait_batches(2)
    broker.confirms[1].set_result(None)
    broker.confirms[0].set_exception(ConnectionError("gone"))
    try:
        await asyncio.wait_for(spanning, 5)
    except ConnectionError:
        pass
    else:
        raise AssertionError("an input whose batch failed was taken for logged")


async def test_a_record_bigger_than_the_budget_goes_alone_and_counts_still_cut() -> None:
    broker = HeldBroker()
    log = writer(broker, max_bytes=50_000, max_records=3)
    done = log.add([record(1, 10), record(2, 80_000), record(3, 10)])
    log.add([record(n, 10) for n in range(4, 8)])
    log.flush()
    await broker.wait_batches(4)
    assert [[r.id for r in b.records] for b in broker.batches] == [
        ["out:1"],
        ["out:2"],
        ["out:3", "out:4", "out:5"],
        ["out:6", "out:7"],
    ]
    for confirm in broker.confirms:
        confirm.set_result(None)
    await asyncio.wait_for(done, 5)
