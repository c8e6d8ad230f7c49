"""`consume_pipelined` keeps a queue's order across a hand-over and a failed input.

A group's frames must be applied in the order the shard queue holds them: the decisions
worker drops a frame whose seq is not above the last one it applied (a duplicate). Two ways
lost acknowledged frames in a database outage (issue 23), both through the order a quorum
queue redelivers messages given back (in the order they come back, ahead of the rest):
- a hand-over (`stop`) that nacked what was delivered but not handled one by one, while the
  loop could still take and handle some of it: a later frame applied, an earlier one
  redelivered after it and dropped;
- a handler that failed (the store unreachable for a rebuild) on one message, which was nacked
  while the next ones of the same group were handled.
The in-memory queue redelivers as a quorum queue does (tests/memory_bus.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractQueue

from services.common.bus import ConsumerHalted, completed, consume_pipelined
from services.common.messages import Envelope, MessageType, Resync
from tests.memory_bus import MemoryQueue

TIMEOUT = 5.0


def amqp(queue: MemoryQueue) -> AbstractQueue:
    return cast(AbstractQueue, queue)  # what consume_pipelined uses of one


def fill(queue: MemoryQueue, count: int) -> None:
    for seq in range(1, count + 1):
        envelope = Envelope[Resync](
            type=MessageType.RESYNC, session="s", group="g", seq=seq, payload=Resync()
        )
        queue.put(envelope.encode(), None, f"m{seq}")


class Worker:
    """Applies each seq once and in order, as a group's state does (a lower seq is dropped)."""

    def __init__(self) -> None:
        self.applied: list[int] = []
        self.dropped: list[int] = []
        self.fail_once: set[int] = set()
        self.stop_at: int | None = None
        self.stop = asyncio.Event()

    async def handle(self, envelope: Envelope) -> Awaitable[Any]:
        seq = envelope.seq or 0
        if seq in self.fail_once:
            self.fail_once.discard(seq)
            raise ConnectionError("the store is unreachable")
        if self.applied and seq <= self.applied[-1]:
            self.dropped.append(seq)
        else:
            self.applied.append(seq)
        if seq == self.stop_at:
            self.stop.set()  # the shard is handed over while its queue still holds messages
        return completed()


async def test_a_hand_over_gives_back_what_was_not_handled_in_order() -> None:
    queue = MemoryQueue("shard.0", prefetch=50)
    fill(queue, 40)
    first = Worker()
    first.stop_at = 10
    await asyncio.wait_for(consume_pipelined(amqp(queue), first.handle, stop=first.stop), TIMEOUT)
    assert first.applied == list(range(1, 11))
    assert queue.acked == 10
    queue.close_channel()  # the shard's own channel: the rest comes back in order
    second = Worker()
    second.applied = list(first.applied)  # rebuilt from the log
    second.stop_at = 40
    await asyncio.wait_for(consume_pipelined(amqp(queue), second.handle, stop=second.stop), TIMEOUT)
    assert second.applied == list(range(1, 41)) and second.dropped == []
    assert queue.idle


async def test_a_failed_input_halts_the_consumer_before_it() -> None:
    queue = MemoryQueue("shard.0", prefetch=50)
    fill(queue, 20)
    worker = Worker()
    worker.fail_once = {5}
    worker.stop_at = 20
    with pytest.raises(ConsumerHalted):
        await asyncio.wait_for(
            consume_pipelined(amqp(queue), worker.handle, stop=worker.stop, halt_on_failure=True),
            TIMEOUT,
        )
    assert worker.applied == [1, 2, 3, 4]
    queue.close_channel()  # then consumed again, from the failed input on
    await asyncio.wait_for(
        consume_pipelined(amqp(queue), worker.handle, stop=worker.stop, halt_on_failure=True),
        TIMEOUT,
    )
    assert worker.applied == list(range(1, 21)) and worker.dropped == []
    assert queue.idle


async def test_without_halting_a_failed_input_comes_back_after_later_ones() -> None:
    """Why decisions halts: the default (nack and go on) suits consumers for which order
    does not matter (the store's idempotent writes), not a group's frames."""
    queue = MemoryQueue("q", prefetch=50)
    fill(queue, 8)
    worker = Worker()
    worker.fail_once = {3}
    worker.stop_at = 8
    await asyncio.wait_for(consume_pipelined(amqp(queue), worker.handle, stop=worker.stop), TIMEOUT)
    queue.close_channel()
    assert [m.message_id for m in queue.ready] == ["m3"]  # behind 4..8, already applied


class Batched:
    """Outputs confirmed in bursts, as decisions' log batches confirm their inputs: each
    input's outputs wait for the batch it is in; `confirm` settles the open batch."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.batch: asyncio.Future[None] | None = None
        self.handled: list[int] = []
        self.fail = fail or set()
        self._more = asyncio.Condition()

    async def handle(self, envelope: Envelope) -> Awaitable[Any]:
        seq = envelope.seq or 0
        self.handled.append(seq)
        async with self._more:
            self._more.notify_all()
        if self.batch is None:
            self.batch = asyncio.get_running_loop().create_future()
        batch = self.batch

        async def outputs() -> None:
            await batch
            if seq in self.fail:
                self.fail.discard(seq)
                raise ConnectionError("a publish of this input's outputs failed")

        return outputs()

    async def until(self, count: int) -> None:
        async with self._more:
            await asyncio.wait_for(self._more.wait_for(lambda: len(self.handled) >= count), TIMEOUT)

    def confirm(self) -> None:
        assert self.batch is not None
        self.batch.set_result(None)
        self.batch = None


async def test_inputs_confirmed_together_are_acknowledged_with_one_ack() -> None:
    # Before: one ack per input (20 ack frames for the worker to write, and for RabbitMQ to
    # apply to the quorum queue); a burst finished together now shares one.
    queue = MemoryQueue("shard.0", prefetch=50)
    fill(queue, 20)
    worker = Batched()
    task = asyncio.create_task(consume_pipelined(amqp(queue), worker.handle))
    await worker.until(20)
    assert queue.acked == 0  # nothing before its outputs are confirmed
    worker.confirm()
    await queue.settled(TIMEOUT)
    assert queue.acked == 20 and queue.ack_frames == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_failed_input_in_a_burst_is_given_back_and_the_rest_acknowledged() -> None:
    queue = MemoryQueue("shard.0", prefetch=50)
    fill(queue, 10)
    worker = Batched(fail={4})
    task = asyncio.create_task(consume_pipelined(amqp(queue), worker.handle))
    await worker.until(10)
    worker.confirm()
    # Input 4 comes back (requeued, delivered again), the other nine are acknowledged.
    await worker.until(11)
    assert worker.handled[-1] == 4 and queue.acked == 9 and queue.ack_frames <= 2
    worker.confirm()
    await queue.settled(TIMEOUT)
    assert queue.acked == 10
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_hand_over_acknowledges_every_handled_input_before_it_returns() -> None:
    queue = MemoryQueue("shard.0", prefetch=50)
    fill(queue, 10)
    worker = Batched()
    stop = asyncio.Event()
    task = asyncio.create_task(consume_pipelined(amqp(queue), worker.handle, stop=stop))
    await worker.until(10)
    stop.set()
    worker.confirm()
    await asyncio.wait_for(task, TIMEOUT)
    assert queue.acked == 10 and not queue.unacked
