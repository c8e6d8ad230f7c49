"""Error codes of the public contract (PROTOCOL.md) and the exceptions that carry them.

    CanopyError                    an error with a contract code; never a stack trace to users
    ├── ProtocolError              a participant's frame is rejected (sent back as `error`)
    └── ApiError                   a researcher's HTTP call is rejected (4xx JSON body)

HTTP error codes of the store (`{"error": {"code", "message"}}`): `ApiCode`. Anything that is
not one of these (a bug, the database away) is logged and answered 500 `internal_error`, with
a fixed message.

Bus handlers use a separate, small set of control-flow outcomes (see `services.common.bus.consume`).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_CHANNEL = "unknown_channel"
    INVALID_DECISION = "invalid_decision"
    TOO_MANY_MESSAGES = "too_many_messages"
    PERIOD_NOT_RUNNING = "period_not_running"
    # The experiment's own code raised on an accepted input (PROTOCOL v2): logged, it changed
    # nothing.
    EXPERIMENT_ERROR = "experiment_error"


class ApiCode(StrEnum):
    UNAUTHORIZED = "unauthorized"  # 401
    NOT_FOUND = "not_found"  # 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    INVALID_REQUEST = "invalid_request"  # 422
    UNKNOWN_EXPERIMENT = "unknown_experiment"  # 422
    TOO_MANY_REQUESTS = "too_many_requests"  # 429: CANOPY_MAX_SESSIONS_PER_MINUTE
    INTERNAL_ERROR = "internal_error"  # 500


class CloseCode:
    """WebSocket close codes of the contract."""

    POLICY_VIOLATION = 1008  # a foreign origin, refused before the upgrade (HTTP 403)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # the server failed mid-frame (e.g. the broker): reconnect and resend
    TRY_AGAIN_LATER = 1013  # too slow a reader (CANOPY_OUTBOX_LIMIT), or the store unreachable
    UNKNOWN_PARTICIPANT = 4403
    REPLACED = 4409
    TOO_MANY_CONNECTIONS = 4429  # PROTOCOL v2: a reconnect storm for one seat; try again later


class CanopyError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(CanopyError):
    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(code, message)
        self.seq = seq


class ApiError(CanopyError):
    """`headers`: sent with the error (`WWW-Authenticate` on 401, `Retry-After` on 429)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.headers = headers
