"""The gateway's per-connection FIFO (services/gateway/mailbox.py)."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.mailbox import Mailbox


async def test_items_come_out_in_order_and_a_waiting_get_is_woken() -> None:
    box: Mailbox[int] = Mailbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)  # let it start waiting
    assert not getter.done()
    assert box.put_nowait(1) and box.put_nowait(2)
    assert await asyncio.wait_for(getter, 1) == 1
    assert await box.get() == 2
    assert box.qsize() == 0


async def test_a_full_box_refuses_and_keeps_what_it_has() -> None:
    box: Mailbox[str] = Mailbox(2)
    assert box.put_nowait("a") and box.put_nowait("b")
    assert not box.put_nowait("c")
    assert box.qsize() == 2
    assert box.drop_newest() == "b"
    assert box.put_nowait("c")
    assert [await box.get(), await box.get()] == ["a", "c"]
    assert box.drop_newest() is None


async def test_a_cancelled_get_loses_nothing() -> None:
    box: Mailbox[int] = Mailbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait(7)  # wakes the getter ...
    getter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert await asyncio.wait_for(box.get(), 1) == 7  # still there, and a new get works


async def test_one_consumer_at_a_time() -> None:
    box: Mailbox[int] = Mailbox()
    first = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one consumer"):
        await box.get()
    box.put_nowait(1)
    assert await first == 1


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Mailbox(0)
