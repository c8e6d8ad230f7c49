"""The one-process floor's aggregation (bench.floor.Floor), without sockets."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from bench.floor import Floor


def make_floor(groups: int = 2, size: int = 3) -> Floor:
    codes = (f"c{i}" for i in itertools.count(1))
    return Floor(groups, size, period_length=60.0, clock=lambda: 1000.0, token=lambda: next(codes))


def decode(out: list[tuple[list[str], bytes]]) -> list[tuple[list[str], dict[str, Any]]]:
    return [(codes, orjson.loads(frame)) for codes, frame in out]


def test_session_has_the_shape_the_load_generator_reads() -> None:
    floor = make_floor(groups=2, size=3)
    session = floor.session()
    assert [g["participants"] for g in session["groups"]] == [
        ["c2", "c3", "c4"],
        ["c5", "c6", "c7"],
    ]
    assert session["session"] == "floor-c1"
    assert [p["id_in_group"] for p in session["participants"]] == [1, 2, 3, 1, 2, 3]
    assert floor.knows("c2") and not floor.knows("nobody")


def test_hello_then_period_start_once_the_group_is_complete() -> None:
    floor = make_floor(groups=1, size=2)
    [(to, hello)] = decode(floor.connect("c2"))
    assert to == ["c2"]
    assert hello["channel"] == "hello" and hello["ts"] == 1000.0
    assert hello["payload"] == {
        "participant": "c2",
        "group": "floor-c1-g1",
        "id_in_group": 1,
        "members": ["c2", "c3"],
        "group_decisions": {"c2": None, "c3": None},
        "period": {"number": 1, "state": "waiting", "ends_at": None},
        "last_seq": 0,
    }
    [(_, hello), (to, start)] = decode(floor.connect("c3"))
    assert hello["payload"]["period"] == {"number": 1, "state": "running", "ends_at": 1060.0}
    assert to == ["c2", "c3"]
    assert start == {
        "channel": "period_start",
        "payload": {"period": 1, "length": 60.0, "ends_at": 1060.0},
        "ts": 1000.0,
    }
    floor.disconnect("c3")
    [(_, hello)] = decode(floor.connect("c3"))  # a reconnect: no second period_start
    assert hello["payload"]["period"]["state"] == "running"


def test_a_decision_is_acked_and_broadcast_to_the_connected_members() -> None:
    floor = make_floor(groups=2, size=3)
    for code in ("c2", "c3", "c5"):
        floor.connect(code)
    [(to_ack, ack), (to_all, update)] = decode(
        floor.on_frame("c2", '{"channel":"decisions","payload":7,"seq":1}')
    )
    assert (to_ack, ack["channel"], ack["payload"]) == (["c2"], "ack", {"seq": 1})
    assert sorted(to_all) == ["c2", "c3"]  # c4 is not connected, c5 is another group
    assert update["channel"] == "group_decisions"
    assert update["payload"] == {"c2": 7, "c3": None, "c4": None}
    decode(floor.on_frame("c3", '{"channel":"decisions","payload":{"x":1},"seq":1}'))
    [_, (_, update)] = decode(floor.on_frame("c2", '{"channel":"decisions","payload":8,"seq":2}'))
    assert update["payload"] == {"c2": 8, "c3": {"x": 1}, "c4": None}
    assert floor.decisions_applied == 3
    floor.disconnect("c2")
    [(_, hello)] = decode(floor.connect("c2"))
    assert hello["payload"]["last_seq"] == 2
    assert hello["payload"]["group_decisions"]["c2"] == 8


def test_a_duplicate_is_acked_again_and_not_applied() -> None:
    floor = make_floor(groups=1, size=2)
    floor.connect("c2")
    floor.on_frame("c2", '{"channel":"decisions","payload":5,"seq":3}')
    [(to, ack)] = decode(floor.on_frame("c2", '{"channel":"decisions","payload":9,"seq":2}'))
    assert (to, ack["channel"], ack["payload"]) == (["c2"], "ack", {"seq": 2})
    assert floor.group_of["c2"].decisions["c2"] == 5
    assert floor.decisions_applied == 1


@pytest.mark.parametrize(
    ("message", "code", "seq"),
    [
        ("{not json", "bad_json", None),
        (b'{"channel":"decisions","payload":1,"seq":1}', "bad_message", None),
        ("[1, 2]", "bad_message", None),
        ('{"channel":"decisions","payload":1,"seq":0}', "bad_message", None),
        ('{"channel":"decisions","payload":1,"seq":true}', "bad_message", None),
        ('{"channel":"decisions","seq":4}', "bad_message", 4),
        ('{"channel":"chat","payload":1,"seq":4}', "unknown_channel", 4),
    ],
)
def test_bad_frames_get_the_protocol_errors_and_change_nothing(
    message: str | bytes, code: str, seq: int | None
) -> None:
    floor = make_floor(groups=1, size=2)
    floor.connect("c2")
    [(to, error)] = decode(floor.on_frame("c2", message))
    assert to == ["c2"]
    assert error["channel"] == "error"
    assert (error["payload"]["code"], error["payload"]["seq"]) == (code, seq)
    assert error["payload"]["message"]
    assert floor.decisions_applied == 0
    assert floor.last_seq["c2"] == 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Floor(0, 4, 60.0)
    with pytest.raises(ValueError, match="period_length"):
        Floor(1, 4, 0.0)
