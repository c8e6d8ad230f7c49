"""Settings shared by every Canopy service: read from `CANOPY_*` environment variables only.

Each service subclasses `CommonSettings` and adds its own port and knobs. Validation happens at
start-up, so a mistyped variable stops the process with a clear message instead of half-working.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import ClassVar, Literal

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


def token_problem(token: str, *, production: bool, name: str = "CANOPY_ADMIN_TOKEN") -> str | None:
    """Why `token` cannot be the secret `name` (None: it can).

    Everywhere: empty, whitespace only, or with surrounding whitespace (HTTP strips it from
    header values, so such a token could never match). In production also: a placeholder
    (repeated or not), shorter than MIN_TOKEN_LENGTH, made of fewer than MIN_TOKEN_DISTINCT
    different characters, or anything but visible ASCII (which is what an HTTP header
    carries as it is).
    """
    if not token:
        return f"{name} must be set"
    if token != token.strip():
        return f"{name} must not start or end with whitespace"
    if not production:
        return None
    if (
        _placeholder(token)
        or len(token) < MIN_TOKEN_LENGTH
        or len(set(token)) < MIN_TOKEN_DISTINCT
        or not all("!" <= c <= "~" for c in token)
    ):
        return (
            f"{name} must be set to a random value of at least {MIN_TOKEN_LENGTH} "
            f"visible ASCII characters ({MIN_TOKEN_DISTINCT} different ones) in production "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return None


_INTERNAL_DERIVATION = b"canopy internal token v1"


def derive_internal_token(admin_token: str) -> str:
    """The internal token of a deployment that sets only the admin token (compatibility): a
    one-way function of it, so that it opens `/internal` and never `/api`."""
    if not admin_token:
        return ""
    return hmac.new(admin_token.encode(), _INTERNAL_DERIVATION, hashlib.sha256).hexdigest()


# The secrets a service may hold, each checked like the admin token when it is set.
TOKENS = ("admin_token", "internal_token", "seat_secret")


class CommonSettings(BaseSettings):
    # hide_input_in_errors: a refused setting must not print the admin token (a model-level
    # error would show the whole input, token included) into a log.
    model_config = SettingsConfigDict(
        env_prefix="CANOPY_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    # As this service's own RabbitMQ user, which may do only what the service does (its
    # Secret on Kubernetes, `make run` likewise; services/common/bus/access.py); several URLs,
    # comma-separated, for a cluster's nodes.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    store_url: str = "http://127.0.0.1:8001"
    public_url: str = "http://127.0.0.1:8000"
    # The researchers' bearer token (`/api`, the console); only the store holds it
    # (docs/operations.md, "Who holds which secret").
    admin_token: SecretStr = SecretStr("")
    # The bearer token of the store's `/internal` look-ups, which the gateway and decisions
    # hold instead of the admin token (the store refuses it on `/api`). Empty: derived from
    # the admin token (`derive_internal_token`), so a deployment with one secret still works.
    internal_token: SecretStr = SecretStr("")
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

    # The secrets this service cannot start without; internal_token and seat_secret may
    # also come from the admin token (derived). Each service narrows it to its own share.
    NEEDS: ClassVar[frozenset[str]] = frozenset({"admin_token"})
    # The settings a service's Kubernetes Secret holds for it (deploy/k8s/base/secrets/).
    SECRETS: ClassVar[tuple[str, ...]] = ("admin_token", "amqp_url")

    @model_validator(mode="after")
    def _refuse_placeholder_token(self) -> CommonSettings:
        production = self.env == "production"
        admin = self.admin_token.get_secret_value()
        for field in TOKENS:
            value: str = getattr(self, field).get_secret_value()
            if not value and (field not in self.NEEDS or (field != "admin_token" and admin)):
                continue  # not needed here, or derived from the admin token
            problem = token_problem(value, production=production, name=f"CANOPY_{field.upper()}")
            if problem is not None:
                raise ValueError(problem)  # the message never holds the token itself
        internal = self.internal_token.get_secret_value()
        if internal and internal == admin:
            # Then the internal token would open /api: the very thing it exists to prevent.
            raise ValueError("CANOPY_INTERNAL_TOKEN must differ from CANOPY_ADMIN_TOKEN")
        return self

    def internal_bearer(self) -> str:
        """The token sent to (gateway, decisions) or accepted on (store) `/internal`."""
        return self.internal_token.get_secret_value() or derive_internal_token(
            self.admin_token.get_secret_value()
        )

    def seat_key_secret(self) -> bytes:
        """The HMAC key that mints (store) and checks (gateway) seat keys."""
        return derive_secret(
            self.seat_secret.get_secret_value(), self.admin_token.get_secret_value()
        )
