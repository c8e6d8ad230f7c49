"""The study-link launch row under arrival grouping (bench/launch.py): groups as the sockets
were told them, the lobby's checks from the outside (lobby order, a group formed once, nobody
in two groups) and the summary's and table's lobby rows. Pure: people and export rows made
here."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from bench.launch import (
    LaunchParams,
    Person,
    format_launch,
    group_formation,
    lobby_checks,
    order_violations,
    read_lobby_log,
    seat_checks,
    summarize,
)

KEYS = [f"k{i}" for i in range(8)]
SEAT_OF = {key: i for i, key in enumerate(KEYS)}


def waiter(
    index: int,
    sent: float,
    lobby: float,
    group: str | None = None,
    members: tuple[str, ...] = (),
    told: float | None = None,
    started: float | None = None,
) -> Person:
    """Seat k<index>, code c<index>: /join at `sent`, answered 1 ms later, the socket opened
    2 ms after `sent`, its lobby hello at `lobby`; told of `group` at `told`."""
    person = Person(index, f"label{index}", due=sent, sent=sent, answered=sent + 0.001)
    person.outcome, person.key, person.code = "seated", f"k{index}", f"c{index}"
    person.ws_sent, person.hello = sent + 0.002, lobby
    if group is not None:
        person.group, person.members = group, members
        person.groups_told = {group}
        person.group_hello = told if told is not None else lobby
    person.started = started
    return person


G1 = ("c0", "c1", "c2", "c3")
G2 = ("c4", "c5", "c6", "c7")
FORMED = [("g1", list(G1)), ("g2", list(G2))]


def two_groups() -> list[Person]:
    """Eight people arriving 0.1 s apart, each lobby hello back before the next one left."""
    return [
        waiter(
            i,
            sent=i / 10,
            lobby=i / 10 + 0.01,
            group="g1" if i < 4 else "g2",
            members=G1 if i < 4 else G2,
            told=0.32 if i < 4 else 0.72,
            started=0.35 if i < 4 else 0.75,
        )
        for i in range(8)
    ]


CLEAN = {
    "grouped_after_later": 0,
    "formed_twice": 0,
    "in_two_groups": 0,
    "not_logged": 0,
    "members_differ": 0,
    "left_in_lobby": 0,
    "lobby_timeouts": 0,
}


def test_groups_formed_in_order_of_arrival_pass_every_check() -> None:
    assert lobby_checks(two_groups(), FORMED, 0, 4) == CLEAN


def test_someone_grouped_after_a_later_arrival_is_a_violation() -> None:
    people = two_groups()
    # Person 1 (lobby hello at 0.11, before person 4 opened their socket at 0.402) ends up in
    # the second group, person 4 in the first: 4 was grouped before someone who was waiting.
    g1, g2 = ("c0", "c4", "c2", "c3"), ("c1", "c5", "c6", "c7")
    for p in people:
        if p.code in g1:
            p.group, p.members = "g1", g1
        else:
            p.group, p.members = "g2", g2
    checks = lobby_checks(people, [("g1", list(g1)), ("g2", list(g2))], 0, 4)
    # 4 is before 1 (g1 before g2); 2 and 3 (g1) came after 1 (g2) too.
    assert checks == CLEAN | {"grouped_after_later": 3}


def test_within_a_group_a_later_arrival_must_not_take_an_earlier_place() -> None:
    people = two_groups()
    swapped = ("c1", "c0", "c2", "c3")  # 1 before 0, though 0 was in the lobby before 1 left
    for p in people[:4]:
        p.members = swapped
    assert lobby_checks(people, [("g1", list(swapped)), FORMED[1]], 0, 4) == CLEAN | {
        "grouped_after_later": 1
    }


def test_arrivals_that_overlap_may_be_taken_in_either_order() -> None:
    people = two_groups()
    # Person 4's socket opened before person 3's lobby hello came back: either order holds.
    people[3].hello = 0.5
    swapped = ("c0", "c1", "c2", "c4")
    people[3].group, people[3].members = "g2", ("c3", "c5", "c6", "c7")
    people[4].group, people[4].members = "g1", swapped
    for p in people[:3]:
        p.members = swapped
    for p in people[5:]:
        p.members = ("c3", "c5", "c6", "c7")
    formed = [("g1", list(swapped)), ("g2", ["c3", "c5", "c6", "c7"])]
    assert lobby_checks(people, formed, 0, 4) == CLEAN
    people[3].hello = 0.3  # back before 4 left: now 3 after 4 is proven out of order
    assert lobby_checks(people, formed, 0, 4)["grouped_after_later"] == 1


def test_the_export_must_hold_each_group_once_and_each_person_in_one() -> None:
    people = two_groups()
    assert lobby_checks(people, [*FORMED, FORMED[0]], 0, 4)["formed_twice"] == 1
    # c0 in a second row's members too (a second group formed with them).
    third = ("g3", ["c0", "x1", "x2", "x3"])
    assert lobby_checks(people, [*FORMED, third], 0, 4)["in_two_groups"] == 1
    # Or a socket told of two groups.
    people[5].groups_told = {"g2", "g1"}
    assert lobby_checks(people, FORMED, 0, 4)["in_two_groups"] == 1
    people[5].groups_told = {"g2"}
    # A group told to a socket but never logged; a hello whose members differ from the row.
    assert lobby_checks(people, FORMED[:1], 0, 4)["not_logged"] == 4
    people[6].members = ("c4", "c5", "c7", "c6")
    assert lobby_checks(people, FORMED, 0, 4)["members_differ"] == 1
    assert lobby_checks(people, FORMED, 2, 4)["lobby_timeouts"] == 2


def test_only_a_remainder_smaller_than_a_group_may_stay_in_the_lobby() -> None:
    people = two_groups()
    alone = waiter(8, sent=0.8, lobby=0.81)  # the ninth: no group can form for them
    assert lobby_checks([*people, alone], FORMED, 0, 4)["left_in_lobby"] == 0
    people[7].group, people[7].group_hello, people[7].groups_told = None, None, set()
    # Eight connected, one of them never grouped (and one group short): that is a fault.
    formed = [FORMED[0], ("g2", ["c4", "c5", "c6", "c7"])]
    assert lobby_checks(people, formed, 0, 4)["left_in_lobby"] == 1


def test_arrival_groups_are_the_ones_the_sockets_were_told_not_the_seats() -> None:
    people = two_groups()
    # Seats say nothing under arrival grouping: seat k0 in g2, k4 in g1 changes nothing.
    people[0].key, people[4].key = "k4", "k0"
    formation = group_formation(people, SEAT_OF, 4, by_seat=False)
    assert formation["complete"] == 2 and formation["started"] == 2
    # Last arrivals: person 3 (lobby hello 0.31) and person 7 (0.71).
    assert formation["to_group_hello"] == [pytest.approx(0.01), pytest.approx(0.01)]
    assert formation["from_hello"] == [pytest.approx(0.04), pytest.approx(0.04)]
    assert formation["from_join"] == [pytest.approx(0.05), pytest.approx(0.05)]
    # Someone not told of a group yet counts in none (under fixed grouping: their seat's).
    people[7].group = None
    assert group_formation(people, SEAT_OF, 4, by_seat=False)["complete"] == 1


def test_the_arrival_summary_needs_the_export_and_shows_the_lobby() -> None:
    params = LaunchParams(people=9, seats=8, group_size=4, within=1.0)
    assert params.grouping == "arrival"  # the launch row's default: a Prolific study's
    people = two_groups()
    full = Person(8, "label8", due=0.8, sent=0.8, answered=0.81, outcome="full")
    people[2].lobby_frames = 3
    detail: list[dict[str, Any]] = [{"key": k, "label": f"label{i}"} for i, k in enumerate(KEYS)]
    summary = summarize([*people, full], params, KEYS, detail, 0.0, FORMED, 0)
    assert summary["ok"], summary
    assert summary["lobby_checks"] == CLEAN
    assert summary["lobby"] == {"groups_formed": 2, "lobby_frames": 3, "order_compared": 7}
    assert summary["counts"]["groups_started"] == 2
    assert summary["join_to_hello_ms"]["max"] == pytest.approx(10.0)
    assert summary["join_to_group_hello_ms"]["max"] == pytest.approx(320.0)  # 0 and 4
    assert summary["group_hello_ms"]["p50"] == pytest.approx(10.0)
    # Without the export's rows nothing is proven: not ok.
    unproven = summarize([*people, full], params, KEYS, detail, 0.0)
    assert not unproven["ok"] and unproven["lobby_checks"]["not_logged"] == 8

    result = {
        "params": asdict(params),
        **summary,
        "burst_s": 1.2,
        "processes": {"gateway": {"cpu_s": 0.9, "cpu_pct": 75.0}},
        "stack_cpu_s": 0.9,
        "stack_cpu_pct": 75.0,
        "machine_cpu": {"busy_pct": 60.0, "other_pct": 5.0},
        "rss_mib": {"gateway": {"before": 70.0, "after": 80.0}},
    }
    text = format_launch(result)
    assert "(arrival grouping)" in text
    assert "last lobby hello -> group hello" in text and "grouped after later 0" in text
    assert "lobby: 2 groups formed (export), 3 lobby frames to the seated, 7 people" in text
    assert "stack CPU per person: 100.0 ms" in text  # 0.9 s over 9 people


def _row(channel: str, ts: str, value: Any, group: str = "") -> dict[str, Any]:
    return {"ts": f"2026-12-07T10:00:{ts}Z", "group": group, "channel": channel, "value": value}


def test_the_lobby_log_gives_groups_timeouts_and_how_long_forming_took() -> None:
    rows = [
        _row("lobby_join", "00.000000", {"participant": "c0"}),
        _row("lobby_join", "00.100000", {"participant": "c1"}),
        _row("group_formed", "00.130000", {"group": "g1", "members": ["c0", "c1"]}),
        _row("period_start", "00.140000", {}, group="g1"),  # a group's row: not the lobby's
        _row("lobby_join", "00.500000", {"participant": "c2"}),
        _row("lobby_join", "00.600000", {"participant": "c3"}),
        _row("group_formed", "00.650000", {"group": "g2", "members": ["c2", "c3"]}),
        _row("lobby_join", "01.000000", {"participant": "c4"}),
        _row("lobby_timeout", "05.000000", {"participant": "c4"}),
    ]
    log = read_lobby_log(rows)
    assert log.formed == [("g1", ["c0", "c1"]), ("g2", ["c2", "c3"])]
    assert log.timeouts == 1 and log.joins == 5
    assert log.form_s == [pytest.approx(0.03, abs=1e-5), pytest.approx(0.05, abs=1e-5)]
    assert log.join_span_s == pytest.approx(1.0)


def test_a_seat_whose_socket_failed_is_still_a_seat_given() -> None:
    """A 303 then a socket closed with 1013 (the store slow to answer the gateway's seat
    look-up): the seat was given, in order, with its label; only the error is counted."""
    people = two_groups()
    people[5].outcome, people[5].error = "error", "ws 1013"
    detail = [{"key": k, "label": f"label{i}"} for i, k in enumerate(KEYS)]
    assert not any(seat_checks(people, KEYS, detail).values())
    assert order_violations(people, SEAT_OF) == {"seat_after_full": 0, "seat_order": 0}
