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
