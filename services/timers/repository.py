"""The timers' durable state in MongoDB: one schedule per (group, period), and the lease.

`timer_schedules`: `{_id: "<group>:<period>", session, group, period, starts_at, length,
num_subperiods, fired, done, paused}`. A period's ticks follow from `starts_at`, `length` and
`num_subperiods` (`domain.schedule`); `fired` counts the ticks whose publish the broker
confirmed, so a restarted worker resumes at the first tick it cannot prove was sent (that one
may go out twice; decisions applies a tick once). The first `StartPeriod` for a period creates
its schedule; a repeated one finds it. A paused period (on_disconnect pause) is not run; its
resumption moves `starts_at` by the pause, so the remaining ticks keep their spacing.

A lobby's wake-up (PROTOCOL v2 "The lobby": one person's deadline) is a schedule of one tick:
`{_id: "<lobby>:wake:<participant>", kind: "wakeup", session, group, participant, at, event,
fired, done}`; the first `WakeAt` creates it, a repeated one finds it.

`timer_leases`: `{_id: "timers", owner, expires_at}`: only the owner runs schedules, so two
replicas never tick the same period. MongoDB decides who holds it (a conditional update, and
the unique `_id` when two try to create it at once); nothing of Canopy's own.
"""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from services.common.leases import Leases

LEASE = "timers"


class TimersRepository:
    def __init__(self, url: str, database: str) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=5000
        )
        db = self._client[database]
        self.schedules = db["timer_schedules"]
        self._leases = Leases(db["timer_leases"])

    async def setup(self) -> None:
        await self.schedules.create_index("done")

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        await self._client.admin.command("ping")

    async def claim(
        self,
        *,
        session: str,
        group: str,
        period: int,
        length: float,
        num_subperiods: int,
        now: float,
    ) -> dict[str, Any]:
        """The period's schedule: created now (starting `now`) or as created before.

        Insert, and on a duplicate key read the existing one: an upsert with `$setOnInsert`
        would do on MongoDB, but nx-27017 ignores `$setOnInsert` (README)."""
        document = {
            "_id": f"{group}:{period}",
            "session": session,
            "group": group,
            "period": period,
            "starts_at": now,
            "length": length,
            "num_subperiods": num_subperiods,
            "fired": 0,
            "done": False,
        }
        try:
            await self.schedules.insert_one(document)
        except DuplicateKeyError:
            existing = await self.schedules.find_one({"_id": document["_id"]})
            if existing is not None:
                return existing
            raise
        return document

    async def claim_wakeup(
        self, *, session: str, group: str, participant: str, at: float, event: str
    ) -> dict[str, Any]:
        """A wake-up's schedule: created now or as created before (see `claim`)."""
        document = {
            "_id": f"{group}:wake:{participant}",
            "kind": "wakeup",
            "session": session,
            "group": group,
            "participant": participant,
            "at": at,
            "event": event,
            "fired": 0,
            "done": False,
        }
        try:
            await self.schedules.insert_one(document)
        except DuplicateKeyError:
            existing = await self.schedules.find_one({"_id": document["_id"]})
            if existing is not None:
                return existing
            raise
        return document

    async def record_fired(self, schedule_id: str, fired: int, *, done: bool) -> None:
        """`fired` ticks of the schedule are confirmed (never moves backwards)."""
        await self.schedules.update_one(
            {"_id": schedule_id, "fired": {"$lt": fired}},
            {"$set": {"fired": fired, "done": done}},
        )

    async def pending(self) -> list[dict[str, Any]]:
        """Schedules to run: not done, not paused."""
        return [d async for d in self.schedules.find({"done": False}) if not d.get("paused")]

    async def pause(self, schedule_id: str) -> None:
        await self.schedules.update_one({"_id": schedule_id}, {"$set": {"paused": True}})

    async def resume(self, schedule_id: str, *, starts_at: float, fired: int) -> dict[str, Any]:
        """The rest of a paused period: its schedule moved to `starts_at`, from tick `fired`."""
        await self.schedules.update_one(
            {"_id": schedule_id},
            {"$set": {"paused": False, "starts_at": starts_at, "fired": fired, "done": False}},
        )
        document = await self.schedules.find_one({"_id": schedule_id})
        if document is None:
            raise LookupError(schedule_id)
        return document

    async def acquire_lease(self, owner: str, *, now: float, ttl: float) -> bool:
        """Take or renew the lease; False while another owner holds an unexpired one."""
        return await self._leases.acquire(LEASE, owner, now=now, ttl=ttl)

    async def release_lease(self, owner: str) -> None:
        await self._leases.release(LEASE, owner)
