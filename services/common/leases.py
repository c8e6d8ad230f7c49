"""Leases in MongoDB: who owns a named piece of work (the timers, a decisions shard) for now.

`{_id: <key>, owner, expires_at}` in one collection. MongoDB decides every race: taking a lease
is a conditional update (ours already, or expired), and when two try to create it at once the
unique `_id` lets one win. Nothing of Canopy's own decides ownership.

Safety rests on the holder, not the collection: a holder that could not renew within its
lease stops the work before the lease can expire (`Lease.valid`), and a taker only takes an
expired lease, so two holders never overlap by more than the clock drift between machines.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError


class Leases:
    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self._collection = collection

    async def acquire(self, key: str, owner: str, *, now: float, ttl: float) -> bool:
        """Take or renew `key`'s lease until `now + ttl`; False while another holds it."""
        result = await self._collection.update_one(
            {"_id": key, "$or": [{"owner": owner}, {"expires_at": {"$lt": now}}]},
            {"$set": {"owner": owner, "expires_at": now + ttl}},
        )
        if result.matched_count:
            return True
        try:
            await self._collection.insert_one({"_id": key, "owner": owner, "expires_at": now + ttl})
        except DuplicateKeyError:
            return False  # held by another owner
        return True

    async def renew(self, keys: list[str], owner: str, *, now: float, ttl: float) -> bool:
        """Renew every one of `keys` that `owner` holds until `now + ttl`, in one update;
        whether all of them were `owner`'s. (One round trip for a worker's shards instead of
        one per shard: the leases most of an idle stack's MongoDB calls were renewing.) False
        says only that some were not: `acquire` each to tell which (taken by another, or gone
        and taken again)."""
        if not keys:
            return True
        result = await self._collection.update_many(
            {"_id": {"$in": keys}, "owner": owner}, {"$set": {"expires_at": now + ttl}}
        )
        return result.matched_count == len(keys)

    async def release(self, key: str, owner: str) -> None:
        """Give `key` up at once (if ours), instead of letting it expire."""
        await self._collection.delete_one({"_id": key, "owner": owner})

    async def holders(self, keys: list[str], *, now: float) -> dict[str, str]:
        """The owner of each of `keys` held (unexpired) at `now`."""
        cursor = self._collection.find({"_id": {"$in": keys}, "expires_at": {"$gte": now}})
        return {document["_id"]: document["owner"] async for document in cursor}

    async def live(self, *, now: float) -> list[str]:
        """Every key held (unexpired) at `now`."""
        cursor = self._collection.find({"expires_at": {"$gte": now}}, {"_id": 1})
        return [document["_id"] async for document in cursor]
