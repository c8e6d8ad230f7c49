"""Which shards this decisions worker owns: the ones whose MongoDB lease it holds.

Every worker renews a presence lease (`decisions_workers`) and the leases of its shards
(`decisions_leases`) every quarter of `ttl`. From the number of live workers it knows its fair
share, `ceil(shards / workers)`: with more it hands the surplus back (gracefully: its consumer
stops, what it handled is acknowledged, then the lease is released), with fewer it takes free
or expired leases. So the shards spread over the workers, and the shards of a worker that died
are taken over once its leases expire (within `ttl` and a step). MongoDB's conditional updates
and unique `_id` decide each race (services/common/leases.py); the shard queues stay
single-active-consumer, so even a worker that lost its lease unknowingly never handles a
message alongside the new owner.

Taking shards over waits for the log barrier (`claim`), which takes as long as the store needs
to write what waits before it: seconds, after a database outage. The claim runs beside the
lease loop, not inside a step, so the leases of the shards being claimed (and of the others)
go on being renewed meanwhile: a claim that outlasted the lease would otherwise find the lease
lapsed, hand the shards back just after starting to apply their backlog, and take them again.
While a claim runs, a step renews and checks leases but neither takes nor hands back shards.

A worker that cannot renew (MongoDB unreachable) keeps its shards while its leases are surely
still valid, and hands them all back before they can expire: nobody else can take them
meanwhile, and nobody will take them from under it. A link that hangs instead of failing (a
partition) is cut short the same way: a step's calls must answer an interval before expiry
(`pymongo.timeout`), tests/faults/test_db_cutoff.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from services.decisions.repository import DecisionsRepository

log = logging.getLogger(__name__)


def shard_key(index: int) -> str:
    return f"shard.{index}"


class ShardOwnership:
    def __init__(
        self,
        repository: DecisionsRepository,
        *,
        owner: str,
        shards: int,
        ttl: float,
        claim: Callable[[list[int]], Coroutine[Any, Any, None]],
        release: Callable[[int], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._repository = repository
        self._owner = owner
        self._shards = shards
        self._ttl = ttl
        self._claim = claim
        self._release = release
        self._clock = clock
        self.held: set[int] = set()
        self._valid_until = float("-inf")  # our leases surely hold until then (wall time)
        # Set once a step reached MongoDB and the shards it took are consumed (readiness).
        self.stepped = asyncio.Event()
        self._claiming: asyncio.Task[None] | None = None  # the claim under way, if any
        self._claimed: list[int] = []  # the shards it claims
        self._to_claim: list[int] = []  # taken by the step that is running

    @property
    def interval(self) -> float:
        return self._ttl / 4

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.interval)

    async def step(self) -> None:
        at = self._clock()
        await self._settle_claim()
        try:
            # While we hold shards, MongoDB must answer before our leases could expire (less a
            # step to stop consuming): a cut-off link hangs rather than fails, and a worker
            # waiting on it would go on applying inputs after another took its shards.
            with pymongo.timeout(self._budget(at)):
                await self._step(at)
        except PyMongoError as exc:
            log.warning("could not renew the shard leases (%r)", exc)
            # The next step would start an interval from now and must end an interval before
            # expiry: if that leaves it no time, stop now.
            if self.held and self._clock() > self._valid_until - 2 * self.interval:
                log.error("shard leases about to expire unrenewed: handing back %s", self.held)
                await self._cancel_claim()
                for index in sorted(self.held):
                    await self._give_up(index, release_lease=False)
            return
        if self._to_claim:
            # Outside the step's MongoDB deadline (a context variable the task would inherit).
            self._claimed, self._to_claim = self._to_claim, []
            self._claiming = asyncio.create_task(self._claim(self._claimed))
        elif self._claiming is None:
            self.stepped.set()

    async def _settle_claim(self) -> None:
        """Take note of a claim that ended: its shards are consumed now, or (it failed) they
        are handed back, to be taken again by a later step."""
        claiming = self._claiming
        if claiming is None or not claiming.done():
            return
        self._claiming = None
        if claiming.cancelled():
            return
        exc = claiming.exception()
        if exc is None:
            self.stepped.set()
            return
        log.error("taking shards %s over failed (%r): handing them back", self._claimed, exc)
        for index in self._claimed:
            if index in self.held:
                with contextlib.suppress(PyMongoError):
                    await self._give_up(index, release_lease=True)

    async def _cancel_claim(self) -> None:
        """Stop a claim under way (its shards are being handed back)."""
        claiming, self._claiming = self._claiming, None
        if claiming is not None and not claiming.done():
            claiming.cancel()
            await asyncio.gather(claiming, return_exceptions=True)

    def _budget(self, at: float) -> float | None:
        """Seconds a step's MongoDB calls may take: while shards are held, until an interval
        before their leases expire (at least a moment, so that the call fails, not hangs)."""
        if not self.held:
            return self._ttl  # nothing to fence; a hung call is retried on the next step
        return max(0.001, self._valid_until - self.interval - at)

    async def _step(self, at: float) -> None:
        leases = self._repository.shards
        await self._repository.workers.acquire(self._owner, self._owner, now=at, ttl=self._ttl)
        held = [shard_key(index) for index in sorted(self.held)]
        # All held leases in one update (8 shards: 3 MongoDB round trips a step instead of 10,
        # every 0.75 s, idle or not; this loop alone against nx-27017 on disk: 1.6-2.0 -> 1.0-1.2
        # % of a core, 88 -> 30 context switches/s); one by one only if one is no longer ours.
        renewed = await leases.renew(held, self._owner, now=at, ttl=self._ttl)
        for index in [] if renewed else sorted(self.held):
            if index not in self.held:
                continue  # handed back below, with the claim it was part of
            if not await leases.acquire(shard_key(index), self._owner, now=at, ttl=self._ttl):
                log.error("lost the lease of shard %d to another worker", index)
                if self._claiming is not None and index in self._claimed:
                    # It must not start consuming that shard: the claim stops, and the
                    # shards it was taking are handed back (to be taken again later).
                    await self._cancel_claim()
                    for other in self._claimed:
                        if other != index and other in self.held:
                            await self._give_up(other, release_lease=True)
                await self._give_up(index, release_lease=False)
        self._valid_until = at + self._ttl
        if self._claiming is not None:
            return  # shards are being taken over: no other move until they are consumed
        workers = await self._repository.workers.live(now=at)
        fair = math.ceil(self._shards / max(1, len(workers)))
        if len(self.held) > fair:
            surplus = sorted(self.held, reverse=True)[: len(self.held) - fair]
            log.info("%d workers: handing shards %s over", len(workers), surplus)
            for index in surplus:
                await self._give_up(index, release_lease=True)
        elif len(self.held) < fair:
            holders = await leases.holders([shard_key(i) for i in range(self._shards)], now=at)
            free = [i for i in range(self._shards) if shard_key(i) not in holders]
            taken = []
            for index in free[: fair - len(self.held)]:
                if await leases.acquire(shard_key(index), self._owner, now=at, ttl=self._ttl):
                    taken.append(index)
            if taken:
                self.held.update(taken)
                log.info("took shards %s (%d workers)", taken, len(workers))
                self._to_claim = taken  # consumed once the claim, started after the step, ends

    async def _give_up(self, index: int, *, release_lease: bool) -> None:
        self.held.discard(index)
        await self._release(index)
        if release_lease:
            await self._repository.shards.release(shard_key(index), self._owner)

    async def close(self) -> None:
        """Hand every shard over at once (a graceful stop), instead of letting leases expire."""
        await self._cancel_claim()
        for index in sorted(self.held):
            try:
                await self._give_up(index, release_lease=True)
            except PyMongoError as exc:
                log.warning("shard %d not released (%r): its lease will expire", index, exc)
        with contextlib.suppress(PyMongoError):  # then it expires
            await self._repository.workers.release(self._owner, self._owner)
