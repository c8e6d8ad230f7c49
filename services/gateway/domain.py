"""Pure pieces of the gateway: the per-connection flood limit and frame validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from services.common.errors import ErrorCode, ProtocolError
from services.common.messages import InboundFrame


@dataclass
class TokenBucket:
    """`rate` tokens per second, holding at most `burst`. A dozen lines: no library needed."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def parse_frame(text: str, channels: frozenset[str]) -> InboundFrame:
    """Validate one browser → server text frame, raising the contract's error."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a frame must be a JSON object")
    seq = data.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1 else None
    if "payload" not in data:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing field 'payload'", seq)
    try:
        frame = InboundFrame.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'frame'}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError(ErrorCode.BAD_MESSAGE, problems, seq) from None
    if frame.channel not in channels:
        raise ProtocolError(
            ErrorCode.UNKNOWN_CHANNEL,
            f"unknown channel {frame.channel!r}; known: {', '.join(sorted(channels))}",
            frame.seq,
        )
    return frame
