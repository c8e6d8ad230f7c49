"""ShardOwnership with in-memory leases and a clock the test moves: taking shards over (the
claim waits for the log barrier, which can take seconds) must not stop the leases from being
renewed, and a claim that lost its lease or failed must hand its shards back.

The MongoDB side (conditional updates, the unique `_id`) is covered by the integration and
fault tests; here the leases follow the same rule: ours or expired."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from services.decisions.ownership import ShardOwnership, shard_key
from services.decisions.repository import DecisionsRepository

TTL = 3.0


class MemoryLeases:
    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}  # key → (owner, expires_at)

    async def acquire(self, key: str, owner: str, *, now: float, ttl: float) -> bool:
        held = self.leases.get(key)
        if held is not None and held[0] != owner and held[1] >= now:
            return False
        self.leases[key] = (owner, now + ttl)
        return True

    async def renew(self, keys: list[str], owner: str, *, now: float, ttl: float) -> bool:
        ours = [k for k in keys if k in self.leases and self.leases[k][0] == owner]
        for key in ours:
            self.leases[key] = (owner, now + ttl)
        return len(ours) == len(keys)

    async def release(self, key: str, owner: str) -> None:
        if key in self.leases and self.leases[key][0] == owner:
            del self.leases[key]

    async def holders(self, keys: list[str], *, now: float) -> dict[str, str]:
        return {k: o for k, (o, e) in self.leases.items() if k in keys and e >= now}

    async def live(self, *, now: float) -> list[str]:
        return [k for k, (_, e) in self.leases.items() if e >= now]


@dataclass
class Repository:
    shards: MemoryLeases = field(default_factory=MemoryLeases)
    workers: MemoryLeases = field(default_factory=MemoryLeases)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Service:
    """The claim and release a decisions worker gives its ownership, recorded."""

    barrier: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False
    consuming: set[int] = field(default_factory=set)
    released: list[int] = field(default_factory=list)
    claims: list[list[int]] = field(default_factory=list)

    async def claim(self, shards: list[int]) -> None:
        self.claims.append(list(shards))
        await self.barrier.wait()  # the log barrier: as long as the store needs
        if self.fail:
            raise RuntimeError("the bus went away during the claim")
        self.consuming.update(shards)

    async def release(self, index: int) -> None:
        self.consuming.discard(index)
        self.released.append(index)


def ownership(
    repository: Repository, service: Service, clock: Clock, owner: str = "a"
) -> ShardOwnership:
    return ShardOwnership(
        cast(DecisionsRepository, repository),
        owner=owner,
        shards=2,
        ttl=TTL,
        claim=service.claim,
        release=service.release,
        clock=clock,
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def step(shards: ShardOwnership) -> None:
    # A step must never wait on the claim: the lease loop would stop renewing.
    await asyncio.wait_for(shards.step(), timeout=2)


async def test_leases_are_renewed_while_a_long_claim_waits_for_the_log() -> None:
    repository, service, clock = Repository(), Service(), Clock()
    shards = ownership(repository, service, clock)
    await step(shards)
    assert shards.held == {0, 1} and service.claims == [[0, 1]]
    assert not shards.stepped.is_set()  # not ready: the shards are not consumed yet
    for _ in range(8):  # 6 s of barrier wait: twice the lease
        clock.now += shards.interval
        await step(shards)
        await settle()
    assert shards.held == {0, 1} and service.released == []
    for index in (0, 1):
        owner, expires = repository.shards.leases[shard_key(index)]
        assert owner == "a" and expires == clock.now + TTL
    # Another worker finds the shards held, not lapsed.
    other = ownership(repository, Service(), clock, owner="b")
    await step(other)
    assert other.held == set()
    service.barrier.set()
    await settle()
    assert service.consuming == {0, 1}
    clock.now += shards.interval
    await step(shards)
    assert shards.stepped.is_set() and service.claims == [[0, 1]]


async def test_no_shard_moves_while_a_claim_runs() -> None:
    repository, service, clock = Repository(), Service(), Clock()
    shards = ownership(repository, service, clock)
    await step(shards)
    # A second worker appears: the fair share is one shard each, but nothing is handed over
    # in the middle of taking shards over.
    await repository.workers.acquire("b", "b", now=clock.now, ttl=TTL)
    clock.now += shards.interval
    await step(shards)
    assert shards.held == {0, 1} and service.released == []
    service.barrier.set()
    await settle()
    await repository.workers.acquire("b", "b", now=clock.now, ttl=TTL)
    clock.now += shards.interval
    await step(shards)
    assert shards.held == {0} and service.released == [1]


async def test_a_claim_that_lost_its_lease_stops_and_hands_its_shards_back() -> None:
    repository, service, clock = Repository(), Service(), Clock()
    shards = ownership(repository, service, clock)
    await step(shards)
    # Shard 1's lease taken by another (as if ours had lapsed unseen).
    repository.shards.leases[shard_key(1)] = ("b", clock.now + 100)
    clock.now += shards.interval
    await step(shards)
    # Both were handed back (shard 0's lease released for others at once); the same step,
    # finding shard 0 free, takes it again with a claim of its own.
    assert sorted(service.released) == [0, 1]
    assert shards.held == {0} and service.claims == [[0, 1], [0]]
    service.barrier.set()
    await settle()
    assert service.consuming == {0}  # the cancelled claim never started consuming shard 1


async def test_a_failed_claim_hands_its_shards_back_and_they_are_taken_again() -> None:
    repository, service, clock = Repository(), Service(fail=True), Clock()
    shards = ownership(repository, service, clock)
    await step(shards)
    service.barrier.set()
    await settle()
    service.fail = False  # (the next claim may start before the step returns)
    clock.now += shards.interval
    await step(shards)  # notices the failure: hands back, then takes them again
    assert sorted(service.released) == [0, 1]
    assert service.claims == [[0, 1], [0, 1]]
    await settle()
    assert service.consuming == {0, 1}


async def test_a_worker_cut_off_from_mongodb_hands_back_its_shards_during_a_claim() -> None:
    repository, service, clock = Repository(), Service(), Clock()
    shards = ownership(repository, service, clock)
    await step(shards)

    async def unreachable(*args: Any, **kwargs: Any) -> bool:
        from pymongo.errors import ServerSelectionTimeoutError

        raise ServerSelectionTimeoutError("cut off")

    repository.workers.acquire = unreachable  # type: ignore[method-assign]
    for _ in range(3):
        clock.now += shards.interval
        await step(shards)
    assert shards.held == set() and sorted(service.released) == [0, 1]
    service.barrier.set()
    await settle()
    assert service.consuming == set()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="services.decisions.ownership")
