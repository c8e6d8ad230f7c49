"""`Batcher`'s send policy (group commit, patience, in-flight cap, failures) against a stand-in
for the broker whose confirms the test releases by hand. The real broker path is in
tests/integration/test_bus.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest
from pydantic_core import PydanticSerializationError

from services.common.bus import Batcher, Bus, encode_batch
from services.common.messages import Envelope, MessageType


class HeldBroker:
    """Records each batch and holds its confirm until the test resolves it."""

    def __init__(self, *, auto_confirm: bool = False) -> None:
        self.auto_confirm = auto_confirm  # confirm each batch at once instead
        self.batches: list[list[int]] = []
        self.sizes: list[int] = []  # bytes of each batch message
        self.confirms: list[asyncio.Future[None]] = []
        self.published = asyncio.Event()

    async def publish_batch(
        self, exchange: str, key: str, envelopes: Sequence[Envelope], **options: Any
    ) -> None:
        confirm = asyncio.get_running_loop().create_future()
        body = encode_batch(envelopes)
        if options.get("encoded") is not None:  # what the Batcher encoded must be the same
            assert b"[" + b",".join(options["encoded"]) + b"]" == body
        self.batches.append([e.seq or 0 for e in envelopes])
        self.sizes.append(len(body))
        if self.auto_confirm:
            confirm.set_result(None)
        self.confirms.append(confirm)
        self.published.set()
        await confirm

    async def next_batch(self) -> list[int]:
        await asyncio.wait_for(self.published.wait(), 5)
        self.published.clear()
        return self.batches[-1]


def frame(seq: int, payload: Any = None) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group="g",
        participant="p",
        seq=seq,
        payload=payload,
    )


def batcher(broker: HeldBroker, **options: Any) -> Batcher:
    return Batcher(cast(Bus, broker), "x", "k", mandatory=True, reliable=False, **options)


async def test_what_arrives_during_a_confirm_leaves_together_after_it() -> None:
    broker = HeldBroker()
    out = batcher(broker)
    first = out.add(frame(1))
    assert await broker.next_batch() == [1]
    later = [out.add(frame(seq)) for seq in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert broker.batches == [[1]]  # held back while batch 1 is unconfirmed
    broker.confirms[0].set_result(None)
    await first
    assert await broker.next_batch() == [2, 3, 4]
    broker.confirms[1].set_result(None)
    await asyncio.gather(*later)
    assert out.idle


async def test_a_slow_confirm_lets_the_next_batch_go_after_patience_up_to_the_cap() -> None:
    broker = HeldBroker()
    out = batcher(broker, patience=0.02, max_in_flight=2)
    loop = asyncio.get_running_loop()
    out.add(frame(1))
    await broker.next_batch()
    sent_at = loop.time()
    out.add(frame(2))
    assert await broker.next_batch() == [2]
    assert loop.time() - sent_at >= 0.015  # waited for patience, not for the confirm
    third = out.add(frame(3))
    await asyncio.sleep(0.05)
    assert len(broker.batches) == 2  # two unconfirmed: the cap holds the third back
    broker.confirms[1].set_result(None)  # confirms may come back out of order
    assert await broker.next_batch() == [3]
    broker.confirms[0].set_result(None)
    broker.confirms[2].set_result(None)
    await third


async def test_a_failed_batch_fails_its_futures_and_the_next_batch_still_goes() -> None:
    broker = HeldBroker()
    out = batcher(broker)
    failed = [out.add(frame(1)), out.add(frame(2))]
    await broker.next_batch()
    waiting = out.add(frame(3))
    broker.confirms[0].set_exception(ConnectionError("broker gone"))
    for future in failed:
        with pytest.raises(ConnectionError):
            await future
    assert await broker.next_batch() == [3]
    broker.confirms[1].set_result(None)
    await waiting


async def test_max_items_splits_batches() -> None:
    broker = HeldBroker()
    out = batcher(broker, max_items=2)
    futures = [out.add(frame(seq)) for seq in range(1, 6)]
    for expected in ([1, 2], [3, 4], [5]):
        assert await broker.next_batch() == expected
        broker.confirms[-1].set_result(None)
    await asyncio.gather(*futures)


async def test_big_envelopes_split_batches_by_bytes_in_order() -> None:
    # A broadcast may hold up to 256 KiB (PROTOCOL v2): 500 to a batch would be a message of
    # about 128 MiB, which RabbitMQ refuses by default, and a reliable publish retries forever.
    broker = HeldBroker(auto_confirm=True)
    out = batcher(broker)
    big = "x" * 300 * 1024
    await asyncio.wait_for(asyncio.gather(*(out.add(frame(seq, big)) for seq in range(1, 21))), 5)
    assert max(broker.sizes) <= 4 * 1024 * 1024
    assert len(broker.batches) > 1
    assert [seq for batch in broker.batches for seq in batch] == list(range(1, 21))
    assert out.idle


async def test_an_envelope_over_the_byte_budget_goes_alone() -> None:
    broker = HeldBroker(auto_confirm=True)
    out = batcher(broker, max_bytes=2000)
    small, huge = "s" * 500, "h" * 5000  # about 720 and 5,220 bytes encoded
    payloads = [small, small, huge, small, small, small]
    added = [out.add(frame(seq, p)) for seq, p in enumerate(payloads, start=1)]
    await asyncio.wait_for(asyncio.gather(*added), 5)
    assert broker.batches == [[1, 2], [3], [4, 5], [6]]  # a third small one would not fit
    assert broker.sizes[1] > 2000
    assert max(broker.sizes[0], *broker.sizes[2:]) <= 2000


async def test_an_envelope_that_cannot_be_encoded_fails_alone() -> None:
    broker = HeldBroker(auto_confirm=True)
    out = batcher(broker)
    before, bad, after = out.add(frame(1)), out.add(frame(2, object())), out.add(frame(3))
    with pytest.raises(PydanticSerializationError):
        await bad
    await asyncio.wait_for(asyncio.gather(before, after), 5)
    assert broker.batches == [[1, 3]]
