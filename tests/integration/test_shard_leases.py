"""A decisions worker's shard leases on the MongoDB-wire server: renewed all at once.

Each step of `ShardOwnership` (every quarter of the lease, idle or not) renews the worker's
presence and every shard lease it holds; one round trip for all the shards, not one each, is
most of what an idle stack asks of MongoDB. The renewal keeps the rule of `Leases.acquire`:
only leases still ours are extended, and a lease another worker took is seen as lost."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from pymongo import AsyncMongoClient, monitoring

from services.common.leases import Leases
from services.decisions.ownership import ShardOwnership, shard_key
from services.decisions.repository import DecisionsRepository

pytestmark = [pytest.mark.integration]

SHARDS = 8
TTL = 3.0


class Commands(monitoring.CommandListener):
    """The commands the client sent, by name."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass
class Repository:
    shards: Leases
    workers: Leases


@pytest.fixture
async def client(infra: Any) -> AsyncIterator[tuple[AsyncMongoClient[dict[str, Any]], Commands]]:
    commands = Commands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        infra.mongo_url, serverSelectionTimeoutMS=5000, event_listeners=[commands]
    )
    yield client, commands
    await client.close()


async def test_renew_extends_only_our_leases_in_one_update(
    client: tuple[AsyncMongoClient[dict[str, Any]], Commands],
) -> None:
    mongo, commands = client
    leases = Leases(mongo[f"leases_{secrets.token_hex(4)}"]["decisions_leases"])
    for key in ("shard.0", "shard.1"):
        assert await leases.acquire(key, "a", now=100.0, ttl=TTL)
    assert await leases.acquire("shard.2", "b", now=100.0, ttl=TTL)
    commands.names.clear()
    assert await leases.renew(["shard.0", "shard.1"], "a", now=102.0, ttl=TTL)
    assert commands.names == ["update"]
    assert await leases.holders(["shard.0", "shard.1"], now=104.5) == {
        "shard.0": "a",
        "shard.1": "a",
    }
    # One that another worker holds is not extended, and the renewal says so.
    assert not await leases.renew(["shard.1", "shard.2"], "a", now=103.0, ttl=TTL)
    assert await leases.holders(["shard.2"], now=102.9) == {"shard.2": "b"}
    assert await leases.holders(["shard.2"], now=103.1) == {}  # b's, as b left it
    assert await leases.holders(["shard.1"], now=105.9) == {"shard.1": "a"}
    assert await leases.renew([], "a", now=103.0, ttl=TTL)


async def test_a_step_renews_a_workers_shards_in_three_round_trips(
    client: tuple[AsyncMongoClient[dict[str, Any]], Commands],
) -> None:
    mongo, commands = client
    db = mongo[f"ownership_{secrets.token_hex(4)}"]
    repository = Repository(Leases(db["decisions_leases"]), Leases(db["decisions_workers"]))
    clock = [1000.0]
    consuming: set[int] = set()

    async def claim(shards: list[int]) -> None:
        consuming.update(shards)

    async def release(index: int) -> None:
        consuming.discard(index)

    ownership = ShardOwnership(
        cast(DecisionsRepository, repository),
        owner="worker-a",
        shards=SHARDS,
        ttl=TTL,
        claim=claim,
        release=release,
        clock=lambda: clock[0],
    )
    await ownership.step()  # takes every shard (the only worker)
    assert ownership._claiming is not None
    await ownership._claiming
    await ownership.step()  # the claim settles
    assert ownership.held == set(range(SHARDS)) and consuming == set(range(SHARDS))

    clock[0] += ownership.interval
    commands.names.clear()
    await ownership.step()
    # The worker's presence, all eight shard leases, the live workers: 3, not 2 + 8.
    assert commands.names == ["update", "update", "find"]
    renewed = await repository.shards.holders(
        [shard_key(i) for i in range(SHARDS)], now=clock[0] + TTL - 0.1
    )
    assert renewed == {shard_key(i): "worker-a" for i in range(SHARDS)}

    # A lease taken by another worker meanwhile (ours had lapsed) is lost, and only that one.
    await db["decisions_leases"].update_one(
        {"_id": shard_key(5)}, {"$set": {"owner": "worker-b", "expires_at": clock[0] + 60}}
    )
    clock[0] += ownership.interval
    await ownership.step()
    assert ownership.held == set(range(SHARDS)) - {5} and 5 not in consuming
