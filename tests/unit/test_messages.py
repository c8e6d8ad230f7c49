"""The bus payloads (services/common/messages.py): what a sender builds is what its reader reads,
through the bytes the bus carries; readers ignore fields a newer sender adds, refuse a payload
that is not the message, and read what older senders sent (the wire forms from before the
models)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common.bus import _ENVELOPES as _BATCH
from services.common.bus import encode_batch
from services.common.messages import (
    Envelope,
    Finished,
    GroupFormed,
    Hello,
    Lobby,
    MessageType,
    PausePeriod,
    Payload,
    PresenceChanged,
    ResumePeriod,
    Resync,
    StartPeriod,
    TimerFired,
    WakeAt,
    WokeUp,
)
from services.decisions.outputs import TimersPayload

SENT: list[tuple[MessageType, Payload]] = [
    (MessageType.START_PERIOD, StartPeriod(period=2, period_length=10.0, num_subperiods=3)),
    (MessageType.PAUSE_PERIOD, PausePeriod(period=2)),
    (MessageType.RESUME_PERIOD, ResumePeriod(period=2, ends_at=1_700_000_010.5, next_tick=3)),
    (MessageType.WAKE_AT, WakeAt(at=1_700_000_300.0, participant="a")),
    (MessageType.PRESENCE_CHANGED, PresenceChanged(connected=True)),
    (MessageType.TIMER_FIRED, TimerFired(event="subperiod", period=1, index=2, ends_at=9.0)),
    (MessageType.TIMER_FIRED, WokeUp(event="lobby_timeout", participant="a", at=5.0)),
    (MessageType.RESYNC, Resync(shards=[0, 3])),
    (MessageType.CONTROL, GroupFormed(group="g1", members=["b", "a"])),
    (MessageType.CONTROL, Lobby(waiting=1, group_size=2, timeout_at=160.0)),
    (MessageType.CONTROL, Finished(outcome="completed", total_payoff=0, redirect=None, code="x")),
]


def carried(envelope: Envelope) -> Envelope:
    """The envelope as its reader gets it: through the bytes of a batch, as the bus sends it."""
    (received,) = _BATCH.validate_json(encode_batch([envelope]))
    return received


@pytest.mark.parametrize(("kind", "payload"), SENT, ids=lambda v: type(v).__name__)
def test_what_a_sender_builds_its_reader_reads(kind: MessageType, payload: Payload) -> None:
    typed: Any = Envelope[type(payload)]  # type: ignore[misc]  # Envelope[StartPeriod], ...
    envelope = typed(type=kind, session="s", group="g", payload=payload)
    received = carried(envelope)
    assert isinstance(received.payload, dict)  # JSON on the wire, until a reader asks
    assert type(payload).of(received) == payload
    assert type(payload).of(envelope) is payload  # in one process: no copy
    # A parametrized envelope serializes the same through pydantic's own dump.
    assert envelope.model_dump(mode="json") == Envelope.decode(envelope.encode()).model_dump()


def test_the_timers_commands_serialize_through_their_union() -> None:
    """`Envelope[Payload]` would serialize `{}` through model_dump (Payload has no fields):
    decisions types its commands with their union."""
    command = ResumePeriod(period=1, ends_at=3.0, next_tick=2)
    envelope = Envelope[TimersPayload](
        type=MessageType.RESUME_PERIOD, session="s", group="g", payload=command
    )
    assert envelope.model_dump()["payload"] == {"period": 1, "ends_at": 3.0, "next_tick": 2}


def test_readers_ignore_fields_a_newer_sender_adds() -> None:
    envelope = Envelope(
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group="g",
        payload={"connected": False, "reason": "tab closed"},
    )
    assert PresenceChanged.of(carried(envelope)) == PresenceChanged(connected=False)


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        (PresenceChanged, {"connected": "maybe"}),
        (StartPeriod, {"period": 1}),  # no length
        (TimerFired, {"event": "period_end"}),  # no period
        (GroupFormed, {"group": "g1", "members": "a"}),
        (ResumePeriod, [1, 2, 3]),
    ],
)
def test_a_payload_that_is_not_the_message_is_refused(model: type[Payload], payload: Any) -> None:
    envelope = Envelope(type=MessageType.CONTROL, session="s", group="g", payload=payload)
    with pytest.raises(ValidationError):
        model.of(carried(envelope))


def test_what_older_senders_sent_still_reads() -> None:
    """The wire forms built by hand before the models: a resync for every connection (`{}` or
    no payload), a wake-up naming its person on the envelope only, ticks without `late`."""

    def of(model: type[Payload], payload: Any, **fields: Any) -> Any:
        envelope = Envelope(type=MessageType.CONTROL, session="s", group="g", **fields)
        return model.of(carried(envelope.model_copy(update={"payload": payload})))

    assert of(Resync, {}).shards is None
    assert of(Resync, None).shards is None
    assert of(Resync, {"shards": [1]}).shards == [1]
    wake = of(WakeAt, {"at": 5.0, "event": "lobby_timeout"}, participant="a")
    assert (wake.at, wake.event, wake.participant) == (5.0, "lobby_timeout", None)
    tick = {"event": "period_start", "period": 1, "index": 0, "starts_at": 1.0, "ends_at": 2.0}
    assert of(TimerFired, tick) == TimerFired(**tick, late=False)
    woke = of(WokeUp, {"event": "lobby_timeout", "participant": "a", "at": 5.0})
    assert woke == WokeUp(event="lobby_timeout", participant="a", at=5.0, late=False)
    assert of(Hello, {"participant": "a", "book": {"bids": []}}).last_seq == 0
    # Read as the hand-written readers did: a presence that says nothing is a closed one, a
    # lobby's tick without an event one the lobby ignores (not a message that fails forever).
    assert of(PresenceChanged, {}) == PresenceChanged(connected=False)
    assert of(WokeUp, {"participant": "a"}).event == ""


def test_a_seat_whose_payoffs_sum_to_the_int_zero_is_sent_the_int() -> None:
    """The export shows the `finished` row as it was sent before the model: 0, not 0.0."""
    finished = Finished(outcome="dropout", total_payoff=0, redirect=None, code=None)
    assert finished.model_dump_json() == (
        '{"outcome":"dropout","total_payoff":0,"redirect":null,"code":null}'
    )
