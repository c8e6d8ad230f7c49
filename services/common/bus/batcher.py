"""The `Batcher`: group commit of envelopes to one destination.

Batches: gateways (inputs) and decisions (broadcasts) send envelopes through a `Batcher`, a group
commit per destination: the first envelope goes out at once, and envelopes that arrive while a
batch is with the broker leave together in the next one. An idle stack therefore adds no latency,
and a busy one sends fewer, larger messages, because the broker's and aio-pika's cost is per
message, not per envelope. A batch is an AMQP message of type `canopy.batch` whose body is a JSON
array of envelopes; consumers accept batches and single envelopes alike.

`Batch` is the rule every batch on the bus is cut by (the `Batcher`'s and decisions' log
writer's, `services.decisions.log`): at most so many items and bytes, an item bigger than that
alone, and a future that the batch's publish settles.

`Gathering` is the rule for a batch that also leaves on time: it opens with its first item
and is due `interval` seconds later at the latest (sooner when its writer finds it full).
Decisions' log writer publishes what it gathers; the store's event writer
(`services.store.handlers`), on the consuming side, writes what it gathers to MongoDB.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.common.bus.wire import BATCH_MAX_BYTES
from services.common.messages import Envelope
from services.common.ports import Publisher

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Batch(Generic[T]):
    """One batch being gathered: its items, their size in bytes as its writer counts them, and
    the future that completes when the broker confirmed the batch (or fails as it did)."""

    confirmed: asyncio.Future[None]
    items: list[T] = field(default_factory=list)
    size: int = 0

    def fits(self, size: int, max_items: int, max_bytes: int, count: int = 1) -> bool:
        """Whether `count` more items of `size` bytes in all may join: a batch holds at most
        `max_items` items and `max_bytes` bytes, but an empty one takes anything (an item
        bigger than a batch goes alone rather than never)."""
        return not self.items or (
            len(self.items) + count <= max_items and self.size + size <= max_bytes
        )

    def add(self, item: T, size: int) -> None:
        self.items.append(item)
        self.size += size

    def offer(self, item: T, size: int, max_items: int, max_bytes: int) -> bool:
        """`add` the item if it `fits`; False if not (its writer starts another batch). One
        call on the hot path, where `fits` and `add` would be two."""
        items = self.items
        if items and (len(items) >= max_items or self.size + size > max_bytes):
            return False
        items.append(item)
        self.size += size
        return True


def all_of(batches: Sequence[asyncio.Future[None]]) -> asyncio.Future[None]:
    """A future that completes when all `batches` did, or fails as the first that failed."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(batches)

    def settle(batch: asyncio.Future[None]) -> None:
        nonlocal left
        if done.done():
            return
        if batch.cancelled():
            done.cancel()
        elif (exc := batch.exception()) is not None:
            done.set_exception(exc)
        else:
            left -= 1
            if not left:
                done.set_result(None)

    for batch in batches:
        batch.add_done_callback(settle)
    return done


@dataclass(eq=False, slots=True)
class _Chunk(Batch[Envelope]):
    """A `Batcher`'s batch: its envelopes, the same encoded, and its size as a message (start
    at 1 for "]", then each body with the "[" or "," before it: `batch_body(encoded)`)."""

    encoded: list[bytes] = field(default_factory=list)


class Batcher:
    """Group commit of envelopes to one destination (exchange + routing key).

    `add` queues an envelope and returns a future that completes when the broker confirmed the
    batch holding it (or fails with that batch's error). Batches leave in order. With nothing
    in flight, an envelope leaves at the end of the current event-loop iteration (so envelopes
    added by one burst of work share a message) and waits for nobody; while a batch is with the
    broker, whatever is added waits and leaves together with the rest once it is confirmed.

    `patience`: a batch whose confirm takes longer than this (a broker disk sync) no longer
    holds up the next one; up to `max_in_flight` batches are then out at once, one per
    `patience`. Without it, `max_in_flight` batches go out without waiting for each other.

    A batch holds at most `max_items` envelopes and `max_bytes` bytes (an envelope bigger than
    that goes alone). The byte budget matters for broadcasts of up to 256 KiB (PROTOCOL v2):
    500 of them would make a message of about 128 MiB, RabbitMQ's default maximum, which the
    broker refuses, and a reliable publish would retry it forever. Each envelope is encoded
    once, when it is added: that gives its size, and the batch is published from those bytes.
    """

    def __init__(
        self,
        bus: Publisher,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool,
        reliable: bool,
        max_in_flight: int = 1,
        patience: float | None = None,
        max_items: int = 500,
        max_bytes: int = BATCH_MAX_BYTES,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._bus = bus
        self._exchange = exchange
        self._routing_key = routing_key
        self._mandatory = mandatory
        self._reliable = reliable
        self._max_in_flight = max_in_flight
        self._patience = patience
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._on_batch = on_batch
        self._chunks: deque[_Chunk] = deque()
        self._in_flight = 0
        self._last_sent = float("-inf")
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> bool:
        return not self._chunks and not self._in_flight

    def add(self, envelope: Envelope) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        try:
            body = envelope.encode()
        except Exception as exc:  # a payload JSON cannot hold: fails this envelope, not a batch
            failed: asyncio.Future[None] = loop.create_future()
            failed.set_exception(exc)
            return failed
        size = len(body) + 1  # with the comma (or bracket) before it
        chunk = self._chunks[-1] if self._chunks else None
        if chunk is None or not chunk.offer(envelope, size, self._max_items, self._max_bytes):
            chunk = _Chunk(loop.create_future(), size=1)
            chunk.add(envelope, size)
            self._chunks.append(chunk)
        chunk.encoded.append(body)
        if not self._scheduled and self._timer is None:
            self._schedule(loop)
        return chunk.confirmed

    def _next_send_at(self) -> float | None:
        """When the next batch may leave (loop time), or None until a confirm arrives."""
        if self._in_flight == 0:
            return float("-inf")
        if self._in_flight >= self._max_in_flight:
            return None
        if self._patience is None:
            return float("-inf")
        return self._last_sent + self._patience

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        at = self._next_send_at()
        if at is None:
            return
        if at <= loop.time():
            self._scheduled = True
            loop.call_soon(self._send)
        else:
            self._timer = loop.call_at(at, self._send)

    def _send(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._chunks:
            at = self._next_send_at()
            if at is None or at > loop.time():
                break
            chunk = self._chunks.popleft()
            self._in_flight += 1
            self._last_sent = loop.time()
            if self._on_batch is not None:
                self._on_batch(len(chunk.items))
            task = loop.create_task(self._publish(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._chunks:
            self._schedule(loop)

    async def _publish(self, chunk: _Chunk) -> None:
        confirmed = chunk.confirmed
        try:
            await self._bus.publish_batch(
                self._exchange,
                self._routing_key,
                chunk.items,
                mandatory=self._mandatory,
                reliable=self._reliable,
                encoded=chunk.encoded,
            )
        except asyncio.CancelledError:
            self._in_flight -= 1
            confirmed.cancel()
            raise
        except Exception as exc:
            if not confirmed.done():
                confirmed.set_exception(exc)
                confirmed.exception()  # retrieved: a batch nobody waits for any more is fine
        else:
            if not confirmed.done():
                confirmed.set_result(None)
        self._in_flight -= 1
        self._send()

    async def close(self) -> None:
        """Wait for what was added to be published (or to fail)."""
        while self._tasks or self._chunks:
            if not self._tasks:
                self._send()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Gathering(Generic[T]):
    """The batch a writer is filling, and the timer that makes it due.

    `batch()` is the open batch: a new one if none is open, whose timer calls `due` after
    `interval` seconds. `take()` closes it (its timer stopped) and hands it over; the next item
    opens the next batch. So no item waits more than `interval` for the batch it is in to be
    due, and an idle writer has no timer running. What "full" means (records, bytes) and
    what is done with a batch taken are the writer's; `due` runs in the event loop, outside
    any writer's call.
    """

    def __init__(self, interval: float, due: Callable[[], None]) -> None:
        self._interval = interval
        self._due = due
        self._open: Batch[T] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> Batch[T] | None:
        """The batch being filled, if any (without opening one)."""
        return self._open

    def batch(self) -> Batch[T]:
        """The batch being filled (a new one, with its timer, if none is)."""
        if self._open is None:
            loop = asyncio.get_running_loop()
            self._open = Batch(loop.create_future())
            self._timer = loop.call_later(self._interval, self._due)
        return self._open

    def take(self) -> Batch[T] | None:
        """Close the open batch and hand it over (None if none is open)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._open = self._open, None
        return batch
