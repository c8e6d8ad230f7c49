"""Settings of the gateway service."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    # Per-connection flood limit: sustained frames per second; bursts of twice that pass.
    max_frames_per_second: float = Field(default=100.0, gt=0, le=100_000)
    max_frame_bytes: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    # Frames wait this long for the connection's `hello` (which carries `last_seq`).
    hello_timeout: float = Field(default=5.0, gt=0, le=60)
    # Server frames queued for one slow browser before it is disconnected to resynchronise.
    outbox_limit: int = Field(default=2_000, ge=10, le=1_000_000)
    # Inputs go to a shard queue in batches (see bus.Batcher): the next batch waits for the
    # previous one's confirm, or for this many seconds when a confirm is slow (a disk sync),
    # with at most `input_batches_in_flight` batches unconfirmed.
    input_batch_patience: float = Field(default=0.005, gt=0, le=1)
    input_batches_in_flight: int = Field(default=16, ge=1, le=1000)
