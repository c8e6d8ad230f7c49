"""Settings of the decisions service."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class DecisionsSettings(CommonSettings):
    decisions_port: int = Field(default=8002, ge=1, le=65535)
    # Unacknowledged inputs a worker holds per shard queue.
    decisions_prefetch: int = Field(default=200, ge=1, le=65535)
