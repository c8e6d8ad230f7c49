"""The decisions service's own state in MongoDB: who owns which shard (leases), who is alive.

`decisions_leases`: `{_id: "shard.<n>", owner, expires_at}`: a worker consumes a shard queue
only while it holds that shard's lease (`ownership.ShardOwnership`). `decisions_workers`:
`{_id: <instance>, owner, expires_at}`, renewed by every live worker, so each can tell how many
share the shards. Group state itself is never stored here: it is rebuilt from the event log.
"""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from services.common.leases import Leases


class DecisionsRepository:
    def __init__(self, url: str, database: str) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=2000
        )
        db = self._client[database]
        self.shards = Leases(db["decisions_leases"])
        self.workers = Leases(db["decisions_workers"])

    async def close(self) -> None:
        await self._client.close()
