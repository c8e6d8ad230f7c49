"""Property tests of the participants' frame parser (gateway `parse_frame`, `InboundFrame`).

For any text a browser can send, `parse_frame` returns a frame or raises `ProtocolError` with
the documented code (services/gateway/domain.py lists them); nothing else escapes it. Every
frame it accepts can be carried by the bus and the event log (so an acknowledged frame is
never lost downstream). Pure: no broker, no stack.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.common.bus import BATCH_TYPE, decode_message, encode_batch
from services.common.errors import ErrorCode, ProtocolError
from services.common.messages import (
    Envelope,
    InboundFrame,
    LogBatch,
    MessageType,
    inbound_record,
    server_frame,
)
from services.gateway.domain import MAX_ERROR_MESSAGE, MAX_PAYLOAD_DEPTH, MAX_SEQ, parse_frame
from services.store.domain import event_document
from tests.hostile.conftest import fuzz

CHANNELS = frozenset({"decisions", "orders"})
FIELDS = ("channel", "seq", "payload")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
# Any: a seq is mostly an int, but also every other JSON value and a few near misses.
seqs: st.SearchStrategy[Any] = (
    st.integers(min_value=-3, max_value=40)
    | st.integers(min_value=MAX_SEQ - 2, max_value=MAX_SEQ + 2)
    | st.sampled_from([0, -1, 10**30, True, False, 1.0, 1.5, 1e20, "1", None, [], {}])
    | json_values
)
channels = (
    st.sampled_from(["decisions", "orders", "chat", "", "x" * 64, "x" * 65, "DECISIONS"])
    | st.text(max_size=70)
    | json_values
)
extras = st.dictionaries(
    st.sampled_from(["participant", "group", "session", "id", "ts"]) | st.text(max_size=8),
    json_scalars,
    max_size=2,
).map(lambda d: {k: v for k, v in d.items() if k not in FIELDS})


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    """Frame-shaped objects: each field present or not, of any type, plus extra fields."""
    frame: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        frame["channel"] = draw(channels)
    if draw(st.booleans()) or draw(st.booleans()):
        frame["seq"] = draw(seqs)
    if draw(st.booleans()) or draw(st.booleans()):
        frame["payload"] = draw(json_values)
    if not draw(st.integers(0, 4)):
        frame.update(draw(extras))
    return frame


def depth(value: Any) -> int:
    """Nested arrays / objects in `value` (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def contract_seq(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEQ:
        return value
    return None


def expected(frame: Any) -> tuple[str, int | None] | None:
    """The contract's answer to a frame, from PROTOCOL.md alone: (error code, seq) or None."""
    if not isinstance(frame, dict):
        return ErrorCode.BAD_MESSAGE, None
    seq = contract_seq(frame.get("seq"))
    channel = frame.get("channel")
    if (
        set(frame) != set(FIELDS)
        or seq is None
        or not isinstance(channel, str)
        or not 1 <= len(channel) <= 64
        or depth(frame["payload"]) > MAX_PAYLOAD_DEPTH
    ):
        return ErrorCode.BAD_MESSAGE, seq
    if channel not in CHANNELS:
        return ErrorCode.UNKNOWN_CHANNEL, seq
    return None


def parse(text: str) -> InboundFrame | ProtocolError:
    """`parse_frame`, with its contract error as a value; any other exception fails the test."""
    try:
        return parse_frame(text, CHANNELS)
    except ProtocolError as caught:
        error = caught
    assert error.code in {ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_CHANNEL}
    assert error.message and len(error.message) <= MAX_ERROR_MESSAGE
    assert error.seq is None or contract_seq(error.seq) == error.seq
    return error


def carried(frame: InboundFrame) -> None:
    """What the gateway, decisions and the store do with an accepted frame must not fail."""
    envelope = Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group="g",
        participant="p",
        seq=frame.seq,
        channel=frame.channel,
        payload=frame.payload,
    )
    broadcast = Envelope(
        type=MessageType.BROADCAST, session="s", group="g", payload={"p": frame.payload}
    )
    message = SimpleNamespace(type=BATCH_TYPE, body=encode_batch([envelope, broadcast]))
    decoded = decode_message(message)  # type: ignore[arg-type]
    assert [e.seq for e in decoded] == [frame.seq, None]
    record = inbound_record(decoded[0])
    assert LogBatch.decode(LogBatch(records=[record]).encode()).records[0].id == record.id
    orjson.loads(event_document(record)["value"])
    orjson.loads(server_frame("group_decisions", decoded[1].payload))


def huge_int_inside(value: Any) -> bool:
    """Integers outside 64 bits become floats in the parser (orjson): compare those loosely."""
    if isinstance(value, dict):
        return any(map(huge_int_inside, value.values()))
    if isinstance(value, list):
        return any(map(huge_int_inside, value))
    return isinstance(value, int) and not -(2**63) <= value < 2**64


@fuzz(600)
@given(frames())
@example({"channel": "decisions", "payload": 1, "seq": 1, "participant": "someone-else"})
@example({"channel": "decisions", "payload": 1, "seq": 1, "group": "another-group"})
@example({"channel": "decisions", "payload": 1, "seq": MAX_SEQ})
@example({"channel": "decisions", "payload": 1, "seq": MAX_SEQ + 1})
@example({"channel": "decisions", "payload": 1, "seq": True})
@example({"channel": "decisions", "payload": 1, "seq": 2.0})
@example({"channel": "decisions", "payload": None, "seq": 0})
@example({"channel": "chat", "payload": None, "seq": 3})
def test_every_frame_gets_its_documented_answer(frame: dict[str, Any]) -> None:
    text = json.dumps(frame)
    outcome = parse(text)
    answer = expected(frame)
    if answer is None:
        assert isinstance(outcome, InboundFrame), (text, outcome)
        assert (outcome.channel, outcome.seq) == (frame["channel"], frame["seq"])
        if not huge_int_inside(frame["payload"]):
            assert outcome.payload == frame["payload"]
        carried(outcome)
    else:
        assert isinstance(outcome, ProtocolError), text
        assert (outcome.code, outcome.seq) == answer, (text, outcome.message)


@fuzz(300)
@given(json_values)
def test_any_json_value_is_answered(value: Any) -> None:
    outcome = parse(json.dumps(value))
    if isinstance(outcome, InboundFrame):
        carried(outcome)
    else:
        assert outcome.code != ErrorCode.BAD_JSON


@fuzz(300)
@given(st.text(alphabet=st.characters(codec=None), max_size=200))
@example("")
@example("{")
@example('{"channel": "decisions", "payload": 1, "seq": 1')
@example('{"channel": "decisions", "payload": "\\ud800", "seq": 1}')
@example('{"channel": "decisions", "payload": 1, "seq": 1}\x00')
@example("\ufeff{}")
def test_any_text_is_answered(text: str) -> None:
    outcome = parse(text)
    if isinstance(outcome, InboundFrame):
        carried(outcome)


@fuzz(100)
@given(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400]),
    st.sampled_from(["payload", "seq"]),
)
def test_non_finite_and_overflowing_numbers_are_bad_json(number: str, where: str) -> None:
    """JSON (RFC 8259) has no NaN / Infinity, and a number must fit a double: bad_json.

    Python's `json` would accept NaN and Infinity; the gateway's parser does not."""
    fields = {"channel": '"decisions"', "payload": "0", "seq": "1"} | {where: number}
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    outcome = parse(text)
    assert isinstance(outcome, ProtocolError) and outcome.code == ErrorCode.BAD_JSON, text


@pytest.mark.parametrize(
    ("levels", "code"),
    [
        (MAX_PAYLOAD_DEPTH, None),
        (MAX_PAYLOAD_DEPTH + 1, ErrorCode.BAD_MESSAGE),
        (199, ErrorCode.BAD_MESSAGE),  # the bus' decoders stop near 200 levels
        (256, ErrorCode.BAD_MESSAGE),  # its encoders at 255
        (1000, ErrorCode.BAD_MESSAGE),
        (1100, ErrorCode.BAD_JSON),  # past the JSON parser's own limit
    ],
)
@pytest.mark.parametrize("container", ["[{}]", '{{"k": {}}}'])
def test_deep_nesting(levels: int, code: str | None, container: str) -> None:
    payload = "0"
    for _ in range(levels):
        payload = container.format(payload)
    text = f'{{"channel": "decisions", "payload": {payload}, "seq": 9}}'
    outcome = parse(text)
    if code is None:
        assert isinstance(outcome, InboundFrame)
        carried(outcome)
    else:
        assert isinstance(outcome, ProtocolError)
        assert (outcome.code, outcome.seq) == (code, 9 if code == ErrorCode.BAD_MESSAGE else None)


@pytest.mark.parametrize(
    "payload",
    [
        2**53 + 1,
        2**63,
        -(2**63),
        2**64 + 1,  # becomes a float
        1.7976931348623157e308,
        5e-324,
        -0.0,
        "\u0000",
        "\U0001f600 é ∑ \u202e",
        {"": {"$where": [None, True, "."]}},
        {"a.b": 1, "$set": 2},
        ["x" * 60_000],
    ],
)
def test_unusual_but_valid_payloads_are_carried(payload: Any) -> None:
    outcome = parse(json.dumps({"channel": "decisions", "payload": payload, "seq": 1}))
    assert isinstance(outcome, InboundFrame)
    if isinstance(payload, float) or huge_int_inside(payload):
        assert math.isclose(outcome.payload, payload)
    else:
        assert outcome.payload == payload
    carried(outcome)


def test_errors_never_echo_a_large_frame() -> None:
    frame = {"channel": "decisions", "payload": 1, "seq": 1} | {f"f{i}": i for i in range(3000)}
    outcome = parse(json.dumps(frame))
    assert isinstance(outcome, ProtocolError) and outcome.code == ErrorCode.BAD_MESSAGE
    assert outcome.seq == 1
    outcome = parse(json.dumps({"channel": "c" * 64, "payload": 1, "seq": 2}))
    assert isinstance(outcome, ProtocolError) and outcome.code == ErrorCode.UNKNOWN_CHANNEL
