"""The log barrier's wait (services.common.barrier), as decisions (resend, never give up, the
store's HTTP API unreachable for a while) and the live monitor (give up after a while, even
during a lookup that hangs) use it; against a stand-in store whose answers the test sets."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.common.barrier import wait_for_barrier
from services.common.messages import LogBatch

TIMEOUT = 5.0


class Store:
    """Records the barriers published; `passes` says which of them (by order) it writes."""

    def __init__(self, passes: set[int], failures: int = 0) -> None:
        self.passes = passes
        self.failures = failures  # lookups that fail before any answers
        self.published: list[LogBatch] = []
        self.lookups = 0

    async def publish(self, batch: LogBatch) -> None:
        self.published.append(batch)

    async def passed(self, barrier: str) -> bool:
        self.lookups += 1
        if self.lookups <= self.failures:
            raise httpx.ConnectError("store away")
        ids = [b.barrier for b in self.published]
        return ids.index(barrier) in self.passes


async def test_an_unwritten_barrier_is_sent_again_with_a_new_id() -> None:
    store = Store(passes={1}, failures=3)
    passed = await asyncio.wait_for(
        wait_for_barrier(
            store.publish,
            store.passed,
            poll=0.001,
            resend_after=0.02,
            tolerate=(httpx.HTTPError,),
        ),
        TIMEOUT,
    )
    assert passed
    assert len(store.published) == 2
    first, second = store.published
    assert first.records == [] and second.records == []  # a barrier carries no records
    assert first.barrier and second.barrier and first.barrier != second.barrier


async def test_it_gives_up_after_give_up_after_even_during_a_lookup() -> None:
    hanging = asyncio.Event()
    published: list[LogBatch] = []

    async def publish(batch: LogBatch) -> None:
        published.append(batch)

    async def passed(barrier: str) -> bool:
        await hanging.wait()  # never set: a lookup that does not answer
        return True

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.wait_for(
        wait_for_barrier(publish, passed, poll=0.001, resend_after=None, give_up_after=0.05),
        TIMEOUT,
    )
    assert result is False
    assert loop.time() - started >= 0.05
    assert len(published) == 1  # no resend: resend_after=None


async def test_errors_not_tolerated_propagate_and_a_lookups_own_timeout_is_no_give_up() -> None:
    async def publish(batch: LogBatch) -> None:
        pass

    async def refused(barrier: str) -> bool:
        raise httpx.ConnectError("store away")

    async def timed_out(barrier: str) -> bool:
        raise TimeoutError("a lookup's own timeout")

    with pytest.raises(httpx.ConnectError):
        await wait_for_barrier(publish, refused, poll=0.001, resend_after=1.0)
    with pytest.raises(TimeoutError, match="own timeout"):
        await wait_for_barrier(
            publish, timed_out, poll=0.001, resend_after=1.0, give_up_after=TIMEOUT
        )
