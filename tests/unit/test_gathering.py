"""`Gathering`: the batch being filled opens with its first item, is due `interval` seconds
later unless taken before, and a batch taken stops its timer (no stray `due` afterwards)."""

from __future__ import annotations

import asyncio

from services.common.bus.batcher import Gathering

TIMEOUT = 5.0


async def test_a_batch_is_due_interval_seconds_after_it_opened() -> None:
    due = asyncio.Event()
    gathering: Gathering[str] = Gathering(0.05, due.set)
    assert gathering.open is None
    loop = asyncio.get_running_loop()
    opened = loop.time()
    gathering.batch().add("a", 1)
    gathering.batch().add("b", 1)  # the same batch
    await asyncio.wait_for(due.wait(), TIMEOUT)
    assert loop.time() - opened >= 0.05
    taken = gathering.take()
    assert taken is not None and taken.items == ["a", "b"] and taken.size == 2
    assert gathering.open is None and gathering.take() is None


async def test_a_batch_taken_early_stops_its_timer() -> None:
    calls: list[float] = []
    fired = asyncio.Event()

    def due() -> None:
        calls.append(asyncio.get_running_loop().time())
        fired.set()

    gathering: Gathering[str] = Gathering(0.01, due)
    first = gathering.batch()
    first.add("a", 1)
    assert gathering.take() is first
    second = gathering.batch()  # a new batch, with a timer of its own (due after the first's)
    assert second is not first and not second.items
    await asyncio.wait_for(fired.wait(), TIMEOUT)
    # Timers fire in the order they are due: had the first's not been stopped, it would have
    # run before the second's.
    assert len(calls) == 1
    assert gathering.take() is second
