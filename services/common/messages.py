"""Message schemas: the contract between Canopy services on the bus.

Every bus message is one `Envelope` (JSON). Its `type` says what it is:

commands (imperative, one handler):
    StartPeriod       decisions → timers: run period `payload.period` of a group now
    PausePeriod       decisions → timers: stop that period's clock (on_disconnect pause)
    ResumePeriod      decisions → timers: run its remaining ticks so that it ends at `ends_at`
    WakeAt            decisions → timers: send a lobby a `lobby_timeout` tick for one person
                      at `payload.at` (PROTOCOL v2 "The lobby"), once, durably

events (past tense):
    FrameAccepted     gateway → decisions: a participant frame the broker confirmed (the
                      store gets it from decisions' log batch)
    PresenceChanged   gateway → decisions: a participant connection opened or closed
    TimerFired        timers → decisions: a period started / a sub-period tick / a period ended
                      (payload `TimerFired`), or a lobby's wake-up (`WokeUp`)
    Broadcast         decisions → gateways: a server frame for a group (or one member)
    Control           decisions → gateways: a frame for one connection that the event log
                      does not record
                      (`hello` snapshots, `finished` again, `replaced` notices, the lobby's
                      `lobby` counts and `group_formed`)
    GatewayAlive      gateway → every decisions worker, each second: this gateway (its queue)
                      is alive; silence means its participants are gone (liveness)
    Resync            decisions → every gateway: announce each open connection again (a
                      `PresenceChanged` connected), after a worker rebuilt its groups' state;
                      `shards` limits it to the groups of those shards (a worker took them
                      over); none (or no payload) means every connection

Gateways and decisions send envelopes in batches (`bus.Batcher`): one AMQP message holding a
JSON array of envelopes.

event-log batches (decisions → store, on the `canopy.log` exchange):
    LogBatch          the event log's records (in and out) decisions produced in up to 50 ms;
                      one message per batch, not per event, keeps the broker's work per
                      decision low

Versions (a rolling upgrade runs two side by side). `version` is the MAJOR version of these
schemas, `SCHEMA_VERSION`. A change an older reader can ignore (a new optional field) keeps it,
so readers ignore fields they do not know (`extra="ignore"` on `Envelope`, `LogRecord` and
`LogBatch`): before, a newer gateway's frames, already acknowledged to their participants,
went to the dead-letter queue of an older decisions worker. A change that gives a known field
another meaning raises it, and a reader refuses a version above its own (validation fails, so
the consumer dead-letters the message at once, where the store keeps it and an alert fires):
guessing would be worse. A new `MessageType` is neither: an older reader refuses it as
malformed, so its readers must be deployed before its senders.

Payloads: each message that Canopy's services read has one model below (`StartPeriod`,
`PresenceChanged`, `TimerFired`, `Hello`, ...); its sender builds it, `Envelope[StartPeriod]`,
and its reader reads it with `StartPeriod.of(envelope)`, so mypy checks both sides and pydantic
checks the reader's at the edge. The bus decodes an envelope before anyone knows its type, so a
decoded envelope's payload is the JSON as it came (`Envelope`, i.e. `Envelope[Any]`) until a
reader asks for its model. Payload models ignore unknown fields too (`extra="ignore"`): a newer
sender may add one. A frame's and a broadcast's payload have no model: they are the
researcher's JSON (a participant's decision, an experiment's frame for the browser), and the hot
path does not validate them again.

Frames on the participants' WebSocket are described in PROTOCOL.md; `InboundFrame` validates
the browser → server ones, `server_frame()` builds the server → browser ones.
"""

from __future__ import annotations

import itertools
import os
import time
from enum import StrEnum
from typing import Any, Generic, Literal, Self, TypeAlias, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from typing_extensions import TypeVar  # with a default (PEP 696; typing has it from 3.13)

SCHEMA_VERSION = 1  # the major version of the bus schemas (see "Versions" above)
# Bus messages: unknown fields (from a newer sender of the same major version) are ignored.
_BUS_MODEL = ConfigDict(frozen=True, extra="ignore")


class MessageType(StrEnum):
    START_PERIOD = "StartPeriod"
    PAUSE_PERIOD = "PausePeriod"
    RESUME_PERIOD = "ResumePeriod"
    WAKE_AT = "WakeAt"
    FRAME_ACCEPTED = "FrameAccepted"
    PRESENCE_CHANGED = "PresenceChanged"
    TIMER_FIRED = "TimerFired"
    BROADCAST = "Broadcast"
    CONTROL = "Control"
    GATEWAY_ALIVE = "GatewayAlive"
    RESYNC = "Resync"


class Channel(StrEnum):
    """Server → browser channels of the contract."""

    HELLO = "hello"
    ACK = "ack"
    ERROR = "error"
    GROUP_DECISIONS = "group_decisions"
    PERIOD_START = "period_start"
    SUBPERIOD = "subperiod"
    PERIOD_END = "period_end"
    PERIOD_PAUSED = "period_paused"
    PERIOD_RESUMED = "period_resumed"
    PRESENCE = "presence"
    # PROTOCOL v2 "Online studies": a seat's outcome, addressed to its participant.
    FINISHED = "finished"
    # Internal control channel: tells a gateway to close a connection that was replaced.
    REPLACED = "replaced"


# PROTOCOL v2 "The lobby": a session's lobby is addressed on the bus like a group, by this
# prefix and the session's id (services/common/lobby.py); its event-log rows carry the group "".
LOBBY_PREFIX = "lobby:"


def lobby_group(session: str) -> str:
    """The bus address of a session's lobby (its shard, its routes, its state)."""
    return f"{LOBBY_PREFIX}{session}"


def is_lobby(group: str) -> bool:
    return group.startswith(LOBBY_PREFIX)


_ID_PREFIX = os.urandom(10).hex()  # 80 random bits per process
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """A unique id (messages, log records, connections): not secret, just never reused.

    A random per-process prefix and a counter: 0.3 µs instead of uuid4's 6.6 µs (an
    `os.urandom` system call each), on the path of every envelope.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


def now() -> float:
    return time.time()


# JSON that is not Canopy's to type: a participant's decision, an experiment's frame for the
# browser, a log row's value. Checked for size and depth where it enters (gateway/domain.py).
ResearcherJSON: TypeAlias = Any

# An envelope's payload: a model of this module, or (as decoded, before a reader asks for its
# model; and for frames and broadcasts) the JSON as it came.
P = TypeVar("P", default=ResearcherJSON)


class Envelope(BaseModel, Generic[P]):
    """One bus message; `Envelope[StartPeriod]` carries a `StartPeriod` (see the docstring)."""

    model_config = _BUS_MODEL

    id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    type: MessageType
    # A newer major version fails validation (checked in pydantic-core, no Python call).
    version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    session: str
    group: str
    participant: str | None = None
    # The participant's frame seq (FrameAccepted) or the seq an error answers (Broadcast).
    seq: int | None = None
    channel: str | None = None
    # The gateway connection a message belongs to (frames, presence, hello, replaced).
    connection: str | None = None
    # The queue of the gateway holding that connection (frames, presence): where decisions
    # sends the group's broadcasts.
    gateway: str | None = None
    # When the message entered the bus (epoch seconds), set by its publisher.
    ts: float = Field(default_factory=now)
    # A broadcast caused by a participant's frame: when that frame reached its gateway (the
    # FrameAccepted's `ts`), so that gateways measure delivery latency end to end.
    origin: float | None = None
    # None: no payload (`GatewayAlive`); an `Envelope[X]` is built with its X (the cast: a
    # bare Envelope's P is Any, which None is).
    payload: P = cast(P, None)

    def encode(self) -> bytes:
        # pydantic-core's own JSON serializer: 2.3 µs against 4.7 µs for model_dump + orjson.
        return _ENVELOPE_JSON.to_json(self)

    @classmethod
    def decode(cls, body: bytes) -> Envelope:
        return cls.model_validate_json(body)


# The serializer of the unparametrized class serves `Envelope[X]` too: its payload (typed P, so
# Any here) is serialized from what it holds, a model or JSON.
_ENVELOPE_JSON = Envelope.__pydantic_serializer__


# -- payloads ------------------------------------------------------------------------------------


class Payload(BaseModel):
    """A payload's model: readers ignore fields they do not know, as for the envelope.

    Parametrize an envelope with a model, or a union of models (decisions' `TimersPayload`),
    never with `Payload` itself: `encode()` serializes what the payload holds, but pydantic's
    own `model_dump` follows the declared type, and `Payload` has no fields."""

    model_config = _BUS_MODEL

    @classmethod
    def of(cls, envelope: Envelope) -> Self:
        """`envelope`'s payload as this model (validated; no payload reads as `{}`). Raises
        `pydantic.ValidationError` (a `ValueError`) if it is not one."""
        payload = envelope.payload
        if isinstance(payload, cls):  # built in this process (tests, an in-memory bus)
            return payload
        return cls.model_validate({} if payload is None else payload)


# commands: decisions → timers


class StartPeriod(Payload):
    """Run period `period` of the envelope's group: its schedule is claimed durably, then its
    ticks fire; it starts `delay` seconds after the claim (the session's post_period_delay)."""

    period: int
    period_length: float
    num_subperiods: int = 0
    delay: float = 0.0


class PausePeriod(Payload):
    """Stop that period's clock (on_disconnect: pause); its schedule stays until resumed."""

    period: int


class ResumePeriod(Payload):
    """Run the period's remaining ticks, from tick `next_tick`, so that it ends at `ends_at`."""

    period: int
    ends_at: float
    next_tick: int


class WakeAt(Payload):
    """Send the lobby (the envelope's group) a `TimerFired` `event` for one person at epoch
    time `at`, once, durably. The person is the envelope's `participant` (older senders: here)."""

    at: float
    event: str = "lobby_timeout"
    participant: str | None = None


# events


class PresenceChanged(Payload):
    """gateway → decisions: the envelope's connection opened (`connected`) or closed."""

    # Absent reads as closed, as decisions read it before this model: a required field would
    # make such a message fail on every delivery, holding up its shard queue.
    connected: bool = False


class TimerFired(Payload):
    """timers → decisions: a tick of a group's period (`period_start`, `subperiod` `index`,
    `period_end`); `late`: its deadline passed while no timers worker ran."""

    event: str
    period: int
    index: int = 0
    starts_at: float | None = None
    ends_at: float | None = None
    late: bool = False


class WokeUp(Payload):
    """timers → decisions: the wake-up a `WakeAt` asked for (a `TimerFired` to a lobby)."""

    event: str = ""  # the lobby ignores an event it does not know (as before this model)
    participant: str | None = None  # older senders; the envelope's `participant` otherwise
    at: float | None = None
    late: bool = False


class Resync(Payload):
    """decisions → every gateway: announce each open connection again; only those of the
    groups in `shards` (a worker took them over), or every one (None, or no payload)."""

    shards: list[int] | None = None


# control frames: decisions → one connection (the gateway passes them on to the browser, whose
# contract, PROTOCOL.md, says what else they hold)


class Hello(Payload):
    """The snapshot a connection gets first. The gateway reads `last_seq` (it may raise it to
    what it acked already) and passes on the frame as sent, fields it does not know included."""

    last_seq: int = 0


class GroupFormed(Payload):
    """The lobby formed this person's group (PROTOCOL v2 "The lobby"): the gateway moves the
    connection to `group`, where the person is member number `members.index(code) + 1`."""

    group: str
    members: list[str]


class Lobby(Payload):
    """How far the lobby is, for a person waiting in it."""

    waiting: int
    group_size: int
    timeout_at: float


class Finished(Payload):
    """A seat's end (PROTOCOL v2 "Online studies"), recorded in the event log and sent to its
    participant."""

    outcome: str
    # int | float: a sum of no payoffs is the int 0, and the export shows what was sent.
    total_payoff: int | float | None
    redirect: str | None
    code: str | None


class LogRecord(BaseModel):
    """One row of the event log (PROTOCOL.md export): a frame in, or a server frame out."""

    model_config = _BUS_MODEL

    id: str  # unique: `in:<participant>:<seq>` for frames in, the broadcast's id for frames out
    ts: float  # when the event entered the bus
    session: str
    group: str
    participant: str | None
    direction: Literal["in", "out"]
    channel: str
    seq: int | None
    value: ResearcherJSON


class LogBatch(BaseModel):
    model_config = _BUS_MODEL

    id: str = Field(default_factory=new_id)
    type: Literal["LogBatch"] = "LogBatch"
    version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    ts: float = Field(default_factory=now)
    records: list[LogRecord]
    # A marker the store records once everything before it in its queue of the event log is
    # written: a decisions worker that starts waits for its barrier before it rebuilds any
    # group (services.common.barrier).
    barrier: str | None = None

    def encode(self) -> bytes:
        return LogBatch.__pydantic_serializer__.to_json(self)

    @classmethod
    def decode(cls, body: bytes) -> LogBatch:
        return cls.model_validate_json(body)


def inbound_record(envelope: Envelope, ts: float | None = None) -> LogRecord:
    """The log record of an accepted frame; its id makes a resent frame the same record.

    `ts`: when the frame took its place in the group's order (decisions stamps it, PROTOCOL
    v1.1 "Timestamps"); the envelope's own `ts` (when the gateway published it) otherwise."""
    return _record(envelope, f"in:{envelope.participant}:{envelope.seq}", "in", ts)


def outbound_record(envelope: Envelope) -> LogRecord:
    return _record(envelope, envelope.id, "out", None)


def _record(
    envelope: Envelope, record_id: str, direction: Literal["in", "out"], ts: float | None
) -> LogRecord:
    return LogRecord(
        id=record_id,
        ts=envelope.ts if ts is None else ts,
        session=envelope.session,
        group=envelope.group,
        participant=envelope.participant,
        direction=direction,
        channel=envelope.channel or "",
        seq=envelope.seq,
        value=envelope.payload,
    )


class InboundFrame(BaseModel):
    """A browser → server frame: `{"channel": "decisions", "payload": <JSON>, "seq": 7}`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    channel: StrictStr = Field(min_length=1, max_length=64)
    seq: StrictInt = Field(ge=1, le=2**53)
    payload: ResearcherJSON


def server_frame(channel: str, payload: ResearcherJSON, ts: float | None = None) -> bytes:
    """Encode one server → browser frame; encode once, send to every addressee."""
    return orjson.dumps({"channel": channel, "payload": payload, "ts": now() if ts is None else ts})
