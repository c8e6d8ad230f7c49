"""Timer schedules, frame validation, the flood limit, export rows, settings."""

from __future__ import annotations

import secrets

import pytest
from pydantic import ValidationError

from services.common.errors import ErrorCode, ProtocolError
from services.common.messages import (
    Envelope,
    LogBatch,
    MessageType,
    inbound_record,
    outbound_record,
)
from services.common.settings import CommonSettings
from services.gateway.domain import TokenBucket, parse_frame
from services.store.domain import CreateSession, event_document, iso_ts
from services.timers.domain import schedule

CHANNELS = frozenset({"decisions"})


def test_schedule_is_absolute_and_ends_with_subperiod_then_end() -> None:
    ticks = schedule(period=1, starts_at=100.0, length=9.0, num_subperiods=3)
    assert [(t.event, t.index, t.at) for t in ticks] == [
        ("period_start", 0, 100.0),
        ("subperiod", 1, 103.0),
        ("subperiod", 2, 106.0),
        ("subperiod", 3, 109.0),
        ("period_end", 0, 109.0),
    ]
    assert [t.event for t in schedule(1, 0.0, 5.0, 0)] == ["period_start", "period_end"]


@pytest.mark.parametrize(
    ("text", "code", "seq"),
    [
        ("{", ErrorCode.BAD_JSON, None),
        ("[1]", ErrorCode.BAD_MESSAGE, None),
        ('{"channel": "decisions", "seq": 1}', ErrorCode.BAD_MESSAGE, 1),
        ('{"channel": "decisions", "payload": 1}', ErrorCode.BAD_MESSAGE, None),
        ('{"channel": "decisions", "payload": 1, "seq": "1"}', ErrorCode.BAD_MESSAGE, None),
        ('{"channel": "decisions", "payload": 1, "seq": 0}', ErrorCode.BAD_MESSAGE, None),
        ('{"channel": "decisions", "payload": 1, "seq": true}', ErrorCode.BAD_MESSAGE, None),
        ('{"channel": 5, "payload": 1, "seq": 2}', ErrorCode.BAD_MESSAGE, 2),
        ('{"channel": "chat", "payload": 1, "seq": 3}', ErrorCode.UNKNOWN_CHANNEL, 3),
    ],
)
def test_bad_frames(text: str, code: ErrorCode, seq: int | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_frame(text, CHANNELS)
    assert caught.value.code == code
    assert caught.value.seq == seq


def test_good_frame() -> None:
    frame = parse_frame('{"channel": "decisions", "payload": {"x": [1]}, "seq": 7}', CHANNELS)
    assert (frame.channel, frame.seq, frame.payload) == ("decisions", 7, {"x": [1]})


def test_token_bucket_passes_bursts_and_sustained_rate() -> None:
    bucket = TokenBucket(rate=50, burst=100)
    assert all(bucket.take(0.0) for _ in range(100))
    assert not bucket.take(0.0)
    # 50 frames/s sustained for 10 s pass.
    assert all(bucket.take(1.0 + i / 50) for i in range(500))


def test_log_records_and_documents() -> None:
    frame = Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group="g",
        participant="p",
        seq=3,
        channel="decisions",
        payload={"$set": 1},
        ts=0.5,
    )
    doc = event_document(inbound_record(frame))
    assert doc["_id"] == "in:p:3"
    assert doc["direction"] == "in"
    assert doc["value"] == '{"$set":1}'
    broadcast = Envelope(
        type=MessageType.BROADCAST, session="s", group="g", channel="presence", payload={}
    )
    out = event_document(outbound_record(broadcast))
    assert (out["_id"], out["direction"], out["participant"]) == (broadcast.id, "out", None)
    batch = LogBatch(records=[inbound_record(frame), outbound_record(broadcast)])
    assert LogBatch.decode(batch.encode()) == batch
    assert iso_ts(0.5) == "1970-01-01T00:00:00.500000Z"


def test_envelope_ignores_unknown_fields_and_refuses_a_newer_major_version() -> None:
    # A newer sender of the same major version may add fields (a rolling upgrade).
    envelope = Envelope.model_validate({"type": "Broadcast", "session": "s", "group": "g", "x": 1})
    assert not hasattr(envelope, "x")
    with pytest.raises(ValidationError):
        Envelope.model_validate({"type": "Broadcast", "session": "s", "group": "g", "version": 99})


def test_create_session_validation() -> None:
    ok = CreateSession(experiment="decisions", num_participants=4, group_size=2, period_length=1)
    assert ok.num_periods == 1
    with pytest.raises(ValidationError, match="multiple of group_size"):
        CreateSession(experiment="decisions", num_participants=3, group_size=2, period_length=1)
    with pytest.raises(ValidationError, match="unknown experiment"):
        CreateSession(experiment="nope", num_participants=2, group_size=2, period_length=1)


def test_settings_refuse_placeholder_token_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANOPY_ENV", "production")
    monkeypatch.setenv("CANOPY_ADMIN_TOKEN", "changeme")
    with pytest.raises(ValidationError, match="at least 16"):
        CommonSettings()
    monkeypatch.setenv("CANOPY_ADMIN_TOKEN", "x" * 32)
    with pytest.raises(ValidationError, match="8 different"):
        CommonSettings()
    monkeypatch.setenv("CANOPY_ADMIN_TOKEN", secrets.token_urlsafe(32))
    assert CommonSettings().env == "production"
