"""Settings of the store service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import CommonSettings


class StoreSettings(CommonSettings):
    # The store answers both `/api` (the admin token) and `/internal` (the internal token),
    # and mints seat keys (the seat secret).
    SECRETS: ClassVar[tuple[str, ...]] = (
        "admin_token",
        "internal_token",
        "seat_secret",
        "amqp_url",
        "mongo_url",
    )

    store_port: int = Field(default=8001, ge=1, le=65535)
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    mongo_db: str = Field(default="canopy", min_length=1, max_length=63)
    # Events are written in batches (one transaction each) of at most this many, or after this
    # many seconds. Larger batches mean fewer commits and disk syncs; nothing waits for them but
    # the export and the monitor.
    store_batch_size: int = Field(default=2000, ge=1, le=10000)
    store_batch_seconds: float = Field(default=0.1, gt=0, le=5)
    # `POST /api/sessions` creating more sessions than this in a minute gets 429 (a runaway
    # script must not fill the database). Generous: `make test` creates 53 in its busiest
    # minute (e2e, browser and hostile tests on one stack), a lab a few an hour.
    max_sessions_per_minute: int = Field(default=300, ge=1, le=100_000)
