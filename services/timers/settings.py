"""Settings of the timers service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import CommonSettings


class TimersSettings(CommonSettings):
    # Timers never call the store: no token at all, only the broker and the database.
    NEEDS: ClassVar[frozenset[str]] = frozenset()
    SECRETS: ClassVar[tuple[str, ...]] = ("amqp_url", "mongo_url")
    timers_port: int = Field(default=8003, ge=1, le=65535)
    # The schedules live in the same database as the store's collections.
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    mongo_db: str = Field(default="canopy", min_length=1, max_length=63)
    # The lease that makes one replica the one that ticks: a replica that dies is replaced by
    # another (or by itself, restarted) at most this many seconds later.
    timers_lease_seconds: float = Field(default=3.0, ge=0.3, le=300)
