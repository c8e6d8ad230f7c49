"""A small FIFO for one consuming task: the gateway's per-connection inbox and outbox.

`asyncio.Queue` allocates four deques when it is made (items, getters, putters and the
`join()` event), about 3 KiB even when empty; the gateway held two per connected participant
(measured with tracemalloc: 6.5 KiB of the 47 KiB a participant cost). A connection needs none
of what they are for: one task takes from each box, nobody blocks on a full one (a full outbox
closes the connection instead) and nobody joins. `Mailbox` keeps a list and, only while its
consumer waits, one future.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """FIFO with an optional bound; `put_nowait` from anywhere, `get` from one task at a time."""

    __slots__ = ("_items", "_limit", "_waiter")

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("a mailbox holds at least one item")
        self._items: list[T] = []
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> bool:
        """Append `item`; False (and nothing appended) if the mailbox is full."""
        if self._limit is not None and len(self._items) >= self._limit:
            return False
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def drop_newest(self) -> T | None:
        """Remove and return the newest item (None if empty)."""
        return self._items.pop() if self._items else None

    async def get(self) -> T:
        """The oldest item, waiting for one if need be. Cancelling the wait loses nothing."""
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("a mailbox has one consumer at a time")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        # pop(0) moves the rest: fine for boxes that are nearly always short (a long one is a
        # slow browser, closed at the bound).
        return self._items.pop(0)


class Inbox(Generic[T]):
    """A FIFO bounded in bytes whose writer waits for room instead of dropping: a connection's
    inbox, between its reader and its publisher.

    The gateway stops reading a socket whose inbox is full (its frames wait in the socket, then
    in the browser), so a participant whose frames cannot be published for a while (RabbitMQ
    blocks the gateway, or is slow to confirm) holds at most `max_bytes` of them here, and the
    flood limit still sees them arrive. An empty inbox takes any item, so one bigger than the
    bound still passes (alone).
    """

    __slots__ = ("_box", "_bytes", "_max_bytes", "_room")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("an inbox holds at least one byte")
        self._box: Mailbox[tuple[T, int]] = Mailbox()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._room: asyncio.Future[None] | None = None  # only while its writer waits

    @property
    def full(self) -> bool:
        return self._bytes >= self._max_bytes

    def qsize(self) -> int:
        return self._box.qsize()

    def put_nowait(self, item: T, size: int) -> None:
        """Append `item`, which counts `size` bytes until it is taken (the caller waits for
        `room()` first: nothing is refused here)."""
        self._bytes += size
        self._box.put_nowait((item, size))

    def room(self) -> asyncio.Future[None]:
        """Done once the inbox is not full (at once if it is not)."""
        room = self._room
        if room is None or room.done():
            room = self._room = asyncio.get_running_loop().create_future()
        if not self.full:
            room.set_result(None)
        return room

    async def get(self) -> T:
        """The oldest item, waiting for one if need be (one consumer at a time)."""
        item, size = await self._box.get()
        self._bytes -= size
        room = self._room
        if room is not None and not room.done() and not self.full:
            room.set_result(None)
        return item
