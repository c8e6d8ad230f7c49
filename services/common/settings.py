"""Settings shared by every Canopy service: read from `CANOPY_*` environment variables only.

Each service subclasses `CommonSettings` and adds its own port and knobs. Validation happens at
start-up, so a mistyped variable stops the process with a clear message instead of half-working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_TOKENS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "token", "admin"}
)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANOPY_", extra="ignore", frozen=True)

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    store_url: str = "http://127.0.0.1:8001"
    public_url: str = "http://127.0.0.1:8000"
    admin_token: SecretStr = SecretStr("")
    # Number of shard queues that carry the per-group input streams. Every service must agree.
    # A shard is the unit of decisions scale-out (one active consumer each): use at least as
    # many as decisions replicas. One decisions process (make run) is fastest with 1: inputs
    # are batched per shard, so fewer shards make fuller batches (docs/performance.md).
    shards: int = Field(default=1, ge=1, le=1024)
    # quorum: replicated and durable (production); classic: faster single-node queues.
    queue_type: Literal["quorum", "classic"] = "quorum"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance: str = ""  # defaults to hostname-pid; names the gateway's queue and log lines

    @model_validator(mode="after")
    def _refuse_placeholder_token(self) -> CommonSettings:
        token = self.admin_token.get_secret_value()
        if self.env == "production" and (token.lower() in PLACEHOLDER_TOKENS or len(token) < 16):
            raise ValueError(
                "CANOPY_ADMIN_TOKEN must be set to a random value of at least 16 characters "
                "in production"
            )
        if not token:
            raise ValueError("CANOPY_ADMIN_TOKEN must be set")
        return self
