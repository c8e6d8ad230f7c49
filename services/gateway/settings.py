"""Settings of the gateway service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings
from services.gateway.domain import OriginPolicy


class GatewaySettings(CommonSettings):
    # Internet-facing: the internal token (its look-ups) and the seat secret (checking keys'
    # tags), never the admin token (docs/operations.md, "Who holds which secret").
    NEEDS: ClassVar[frozenset[str]] = frozenset({"internal_token", "seat_secret"})
    SECRETS: ClassVar[tuple[str, ...]] = ("internal_token", "seat_secret", "amqp_url")
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    # Per-participant flood limit (across reconnects, every frame counts): sustained frames per
    # second; bursts of twice that pass.
    max_frames_per_second: float = Field(default=100.0, gt=0, le=100_000)
    # PROTOCOL v2: connections accepted per seat within 60 s; the next get close 4429.
    max_connections_per_minute: int = Field(default=30, ge=1, le=10_000)
    max_frame_bytes: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    # Frames wait this long for the connection's `hello` (which carries `last_seq`).
    hello_timeout: float = Field(default=5.0, gt=0, le=60)
    # Server frames queued for one slow browser before it is disconnected to resynchronise.
    outbox_limit: int = Field(default=2_000, ge=10, le=1_000_000)
    # A connection being closed (too slow, replaced) has this long to take its last frames and
    # the close frame; after that the gateway lets go of it (a peer that reads nothing would
    # otherwise hold it for ever).
    close_grace: float = Field(default=5.0, gt=0, le=120)
    # Browser origins (scheme://host[:port]) that may open participant sockets, comma-separated;
    # `*`: any. Empty: the origin of `public_url`. Clients that send no Origin (scripts, bots)
    # are always let in; a browser from any other origin is refused with HTTP 403.
    allowed_origins: str = ""
    # Inputs go to a shard queue in batches (see bus.Batcher): the next batch waits for the
    # previous one's confirm, or for this many seconds when a confirm is slow (a disk sync),
    # with at most `input_batches_in_flight` batches unconfirmed.
    input_batch_patience: float = Field(default=0.005, gt=0, le=1)
    input_batches_in_flight: int = Field(default=16, ge=1, le=1000)
    # Frames read from one browser and not yet handed to the broker, in bytes (their text plus
    # INBOX_FRAME_COST each): beyond, the gateway stops reading that socket until the broker
    # takes them (it is slow to confirm, or blocks publishers). One frame always fits.
    inbox_bytes: int = Field(default=65_536, ge=1024, le=64 * 1024 * 1024)
    # Messages of the gateway's own queue (broadcasts, hellos) delivered and not yet handled:
    # acknowledged one by one as they are handed to the sockets. Each is at most a batch (4 MiB).
    gateway_prefetch: int = Field(default=64, ge=1, le=65535)

    @model_validator(mode="after")
    def _check_origins(self) -> GatewaySettings:
        self.origin_policy()  # a malformed CANOPY_ALLOWED_ORIGINS stops the gateway at start
        return self

    def origin_policy(self) -> OriginPolicy:
        return OriginPolicy.from_setting(self.allowed_origins, self.public_url)
