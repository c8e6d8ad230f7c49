"""Error codes of the public contract (PROTOCOL.md) and the exceptions that carry them.

    CanopyError                    an error with a contract code; never a stack trace to users
    ├── ProtocolError              a participant's frame is rejected (sent back as `error`)
    └── ApiError                   a researcher's HTTP call is rejected (4xx JSON body)

Bus handlers use a separate, small set of control-flow outcomes (see `bus.py`).
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


class CloseCode:
    """WebSocket close codes of the contract."""

    MESSAGE_TOO_BIG = 1009
    UNKNOWN_PARTICIPANT = 4403
    REPLACED = 4409


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
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status
