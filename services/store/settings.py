"""Settings of the store service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import CommonSettings

MAX_ROW_BYTES = 256 * 1024  # PROTOCOL v2: no log row exceeds 256 KiB
MESSAGE_OVERHEAD = 64 * 1024  # a batch's envelope and JSON around its records, generously


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
    # the export and the monitor. A transaction costs the store and MongoDB several round trips
    # whatever it holds: at 200 decisions/s, 0.25 s instead of 0.1 s halved the CPU of both
    # (docs/performance.md, "Speed, round three"), for at most 0.15 s more export lag.
    store_batch_size: int = Field(default=2000, ge=1, le=10000)
    store_batch_seconds: float = Field(default=0.25, gt=0, le=5)
    # What the store may hold of the log at once (messages delivered and not yet written and
    # acked), in bytes of messages: the prefetch is this over the largest message decisions
    # sends (`store_prefetch`), so a backlog waits in RabbitMQ, not in the store. Decoded, the
    # records take 1 to 8 times their message's bytes (8 for rows of a few numbers).
    store_buffer_bytes: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024, le=2**34)
    # Decisions' CANOPY_LOG_BATCH_BYTES (the same variable, read here too): how big a message
    # of the log can be (a row over it, at most MAX_ROW_BYTES, goes alone).
    log_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=65_536, le=64 * 1024 * 1024)

    def store_prefetch(self) -> int:
        """Messages of the log delivered ahead at most: enough for two batches of
        `store_batch_size` records, and no more than `store_buffer_bytes` of the largest
        messages. RabbitMQ's prefetch counts messages, each up to 1,000 records and
        `log_batch_bytes`: by count alone (2 x 2,000) the store could have been sent 16 GiB."""
        largest = max(self.log_batch_bytes, MAX_ROW_BYTES) + MESSAGE_OVERHEAD
        return max(2, min(2 * self.store_batch_size, self.store_buffer_bytes // largest))

    # `POST /api/sessions` creating more sessions than this in a minute gets 429 (a runaway
    # script must not fill the database). Generous: `make test` creates 53 in its busiest
    # minute (e2e, browser and hostile tests on one stack), a lab a few an hour.
    max_sessions_per_minute: int = Field(default=300, ge=1, le=100_000)
