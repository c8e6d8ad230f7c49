"""Settings of the decisions service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import CommonSettings


class DecisionsSettings(CommonSettings):
    # The store's `/internal` look-ups (group configs, the log) only.
    NEEDS: ClassVar[frozenset[str]] = frozenset({"internal_token"})
    SECRETS: ClassVar[tuple[str, ...]] = ("internal_token", "amqp_url", "mongo_url")
    decisions_port: int = Field(default=8002, ge=1, le=65535)
    # Unacknowledged inputs a worker holds per shard queue.
    decisions_prefetch: int = Field(default=200, ge=1, le=65535)
    # Log records are sent to the store in batches: at most this often, or this many at once.
    # Nobody waits for a batch but the broker's ack of the inputs it holds (a participant's
    # ack comes from the gateway), so the interval costs only export lag. At low load each
    # batch is a broker message, a delivery to the store and a store transaction of its own:
    # 50 ms saved a fifth of the CPU per decision against 10 ms, and 100 ms with the store's
    # 0.25 s another ~15 % at 200 decisions/s (docs/performance.md, "Speed, round three").
    log_batch_seconds: float = Field(default=0.1, gt=0, le=5)
    log_batch_records: int = Field(default=1000, ge=1, le=100_000)
    # ... and at most about this many bytes per batch (RabbitMQ refuses messages over its
    # max_message_size, 128 MiB by default; a row is at most 256 KiB).
    log_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=65_536, le=64 * 1024 * 1024)
    # After a start, members the log says are connected but no gateway announced again within
    # this many seconds are disconnected.
    resync_window: float = Field(default=5.0, gt=0, le=300)
    # A gateway without a heartbeat for this long is taken for dead: its members disconnect.
    gateway_liveness_timeout: float = Field(default=3.0, gt=0, le=300)
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    mongo_db: str = Field(default="canopy", min_length=1, max_length=63)
    # A worker holds each of its shards by a MongoDB lease this long, renewed every quarter of
    # it: a dead worker's shards move to another within about this time.
    shard_lease_seconds: float = Field(default=3.0, ge=0.5, le=300)
    # Handing a shard over waits this long for the inputs in flight to be confirmed.
    shard_release_timeout: float = Field(default=10.0, gt=0, le=300)
    # A shard's consumer stopped by an input that failed starts again after this pause.
    shard_retry_seconds: float = Field(default=0.5, gt=0, le=60)
