"""Settings shared by every Canopy service: read from `CANOPY_*` environment variables only.

Each service subclasses `CommonSettings` and adds its own port and knobs. Validation happens at
start-up, so a mistyped variable stops the process with a clear message instead of half-working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.seats import derive_secret

PLACEHOLDER_TOKENS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "token", "admin"}
)
MIN_TOKEN_LENGTH = 16
MIN_TOKEN_DISTINCT = 8  # "x" * 32 is long, and guessable


def _placeholder(token: str) -> bool:
    """A placeholder word, or one repeated to pass the length check ("changemechangeme")."""
    token = token.lower()
    return token in PLACEHOLDER_TOKENS or any(
        word and len(token) % len(word) == 0 and token == word * (len(token) // len(word))
        for word in PLACEHOLDER_TOKENS
    )


def token_problem(token: str, *, production: bool) -> str | None:
    """Why `token` cannot be the admin token (None: it can).

    Everywhere: empty, whitespace only, or with surrounding whitespace (HTTP strips it from
    header values, so such a token could never match). In production also: a placeholder
    (repeated or not), shorter than MIN_TOKEN_LENGTH, made of fewer than MIN_TOKEN_DISTINCT
    different characters, or anything but visible ASCII (which is what an HTTP header
    carries as it is).
    """
    if not token:
        return "CANOPY_ADMIN_TOKEN must be set"
    if token != token.strip():
        return "CANOPY_ADMIN_TOKEN must not start or end with whitespace"
    if not production:
        return None
    if (
        _placeholder(token)
        or len(token) < MIN_TOKEN_LENGTH
        or len(set(token)) < MIN_TOKEN_DISTINCT
        or not all("!" <= c <= "~" for c in token)
    ):
        return (
            f"CANOPY_ADMIN_TOKEN must be set to a random value of at least {MIN_TOKEN_LENGTH} "
            f"visible ASCII characters ({MIN_TOKEN_DISTINCT} different ones) in production "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return None


class CommonSettings(BaseSettings):
    # hide_input_in_errors: a refused setting must not print the admin token (a model-level
    # error would show the whole input, token included) into a log.
    model_config = SettingsConfigDict(
        env_prefix="CANOPY_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    store_url: str = "http://127.0.0.1:8001"
    public_url: str = "http://127.0.0.1:8000"
    admin_token: SecretStr = SecretStr("")
    # The HMAC secret of participants' seat keys (services/common/seats.py); empty: derived
    # from the admin token. Store and gateways must agree; set it to rotate the admin token
    # without invalidating participants' links.
    seat_secret: SecretStr = SecretStr("")
    # Number of shard queues that carry the per-group input streams. Every service must agree.
    # A shard is the unit of decisions scale-out (one active consumer each): use at least as
    # many as decisions replicas. One decisions process (make run) is fastest with 1: inputs
    # are batched per shard, so fewer shards make fuller batches (docs/performance.md).
    shards: int = Field(default=1, ge=1, le=1024)
    # quorum: replicated and durable (production); classic: faster single-node queues.
    queue_type: Literal["quorum", "classic"] = "quorum"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance: str = ""  # defaults to hostname-pid; names the gateway's queue and log lines
    # On SIGTERM, answer /readyz with 503 this long before stopping (services/common/serve.py):
    # long enough for a load balancer to notice (Kubernetes: a few seconds); 0 stops at once.
    drain_seconds: float = Field(default=0.0, ge=0, le=120)

    @model_validator(mode="after")
    def _refuse_placeholder_token(self) -> CommonSettings:
        problem = token_problem(
            self.admin_token.get_secret_value(), production=self.env == "production"
        )
        if problem is not None:
            raise ValueError(problem)  # the message never holds the token itself
        return self

    def seat_key_secret(self) -> bytes:
        """The HMAC key that mints (store) and checks (gateway) seat keys."""
        return derive_secret(
            self.seat_secret.get_secret_value(), self.admin_token.get_secret_value()
        )
