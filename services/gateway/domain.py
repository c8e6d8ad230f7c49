"""Pure pieces of the gateway: the flood limit, frame validation, and which browser origins
may open a participant socket (seat keys are checked by services.common.seats).

Frame validation answers, for any text (PROTOCOL.md errors; nothing else is ever raised):

    not JSON (RFC 8259), incl. NaN / Infinity literals, numbers that overflow a double
    (1e400), lone surrogate escapes, nesting deeper than the parser's limit   → bad_json
    not an object; a missing, extra or ill-typed field; `seq` not an integer in
    [1, 2^53] (bools and floats are not integers); `channel` not a 1–64 character
    string; a payload nested deeper than MAX_PAYLOAD_DEPTH                     → bad_message
    a well-formed frame on a channel the experiment does not take              → unknown_channel

An error carries the frame's `seq` only when that seq is itself valid. An accepted frame's
payload always survives the bus and the event log (JSON encoders and decoders downstream
refuse nesting around 200 levels: a frame they could not carry would be acknowledged and
then lost, so it is refused here).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from pydantic import ValidationError

from services.common.errors import ErrorCode, ProtocolError
from services.common.messages import InboundFrame

MAX_SEQ = 2**53  # the largest integer a browser's Number holds exactly
# PROTOCOL v2: a seq this far above the participant's last_seq is a bad_message, so that a
# client cannot push its own counter out of reach (2^53 + 1 is 2^53 in JavaScript).
MAX_SEQ_JUMP = 1_000_000
# Arrays / objects inside one payload. Decisions are numbers or small objects; the bus and the
# log wrap a payload in up to ~6 more levels and their decoders stop near 200.
MAX_PAYLOAD_DEPTH = 32
MAX_ERROR_MESSAGE = 300  # characters: an error never echoes a large frame back
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass
class TokenBucket:
    """`rate` tokens per second, holding at most `burst`. A dozen lines: no library needed."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def full(self, now: float) -> bool:
        """Refilled to `burst` by `now`: no different from a new bucket."""
        return self.tokens + (now - self.updated) * self.rate >= self.burst

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class SeatLimits:
    """What one participant may do on this gateway, whatever their connections (PROTOCOL v2
    "Limits"): one flood bucket per participant, kept across reconnects and taken by every
    frame, valid or not; and at most `connections_per_window` connections accepted within
    `window` seconds (a reconnect storm gets close 4429 until the window allows again;
    refused attempts do not count).

    Memory stays bounded: a bucket that has refilled completely and a window with no accept
    left in it carry nothing a fresh one would not, so `prune` drops them; it runs after
    every `prune_every` changes, so the cost per connection stays constant.
    """

    rate: float
    burst: float
    connections_per_window: int = 30
    window: float = 60.0
    prune_every: int = 1_000
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _accepts: dict[str, deque[float]] = field(default_factory=dict)
    _changes: int = 0

    def bucket(self, participant: str, now: float) -> TokenBucket:
        """The participant's flood bucket (a full one if they have none)."""
        bucket = self._buckets.get(participant)
        if bucket is None:
            bucket = self._buckets[participant] = TokenBucket(self.rate, self.burst, updated=now)
            self._changed(now)
        return bucket

    def admit(self, participant: str, now: float) -> bool:
        """Count a connection of `participant` now, or refuse it (its window is full)."""
        accepts = self._accepts.setdefault(participant, deque())
        while accepts and accepts[0] <= now - self.window:
            accepts.popleft()
        if len(accepts) >= self.connections_per_window:
            return False
        accepts.append(now)
        self._changed(now)
        return True

    def retry_after(self, participant: str, now: float) -> float:
        """Seconds until `admit` may let `participant` in again (0: it would now)."""
        accepts = self._accepts.get(participant)
        if not accepts or len(accepts) < self.connections_per_window:
            return 0.0
        return max(0.0, accepts[0] + self.window - now)

    def __len__(self) -> int:
        return len(self._buckets) + len(self._accepts)

    def _changed(self, now: float) -> None:
        self._changes += 1
        if self._changes >= self.prune_every:
            self._changes = 0
            self.prune(now)

    def prune(self, now: float) -> None:
        for participant in [p for p, b in self._buckets.items() if b.full(now)]:
            del self._buckets[participant]
        for participant in [
            p for p, a in self._accepts.items() if not a or a[-1] <= now - self.window
        ]:
            del self._accepts[participant]


def _short(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 1] + "…"


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests arrays / objects more than `limit` levels (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def valid_seq(value: Any) -> int | None:
    """`value` if it is a contract seq (an integer in [1, 2^53], not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEQ:
        return value
    return None


def parse_frame(text: str, channels: frozenset[str]) -> InboundFrame:
    """Validate one browser → server text frame, raising the contract's error."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, _short(f"not JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a frame must be a JSON object")
    seq = valid_seq(data.get("seq"))
    if "payload" not in data:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing field 'payload'", seq)
    try:
        frame = InboundFrame.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'frame'}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError(ErrorCode.BAD_MESSAGE, _short(problems), seq) from None
    if _too_deep(frame.payload, MAX_PAYLOAD_DEPTH):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"payload: nested deeper than {MAX_PAYLOAD_DEPTH} arrays / objects",
            frame.seq,
        )
    if frame.channel not in channels:
        raise ProtocolError(
            ErrorCode.UNKNOWN_CHANNEL,
            _short(f"unknown channel {frame.channel!r}; known: {', '.join(sorted(channels))}"),
            frame.seq,
        )
    return frame


def origin_of(url: str) -> str | None:
    """The serialised origin (`scheme://host[:port]`, lower case, default port dropped) of an
    absolute http(s) URL or an `Origin` header value; None when it has none."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class OriginPolicy:
    """Which browser origins may open a participant socket (setting CANOPY_ALLOWED_ORIGINS).

    A browser always sends `Origin` with a WebSocket handshake; scripts and bots usually send
    none and are let in (they hold a participant code, which is the credential). A foreign
    origin is a page elsewhere trying to use a participant's socket: refused.
    """

    allow_all: bool
    origins: frozenset[str]

    @classmethod
    def from_setting(cls, setting: str, public_url: str) -> OriginPolicy:
        """`setting`: comma-separated origins, `*` for any; empty: the public URL's origin."""
        entries = [entry.strip() for entry in setting.split(",") if entry.strip()]
        if "*" in entries:
            return cls(allow_all=True, origins=frozenset())
        if not entries:
            entries = [public_url]
        origins = set()
        for entry in entries:
            origin = origin_of(entry)
            if origin is None:
                raise ValueError(f"not an http(s) origin: {entry!r}")
            origins.add(origin)
        return cls(allow_all=False, origins=frozenset(origins))

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.allow_all:
            return True
        return origin_of(origin) in self.origins
