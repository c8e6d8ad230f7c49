"""Pure pieces of the study-link launch row (bench/launch.py): the arrival schedule, the
Prolific-like ids, the seat and arrival-order checks, group formation and the summary."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict
from typing import Any

import pytest

from bench.launch import (
    LaunchParams,
    Person,
    arrival_schedule,
    first_answered_seated,
    format_launch,
    group_formation,
    order_violations,
    prolific_ids,
    seat_checks,
    summarize,
)

KEYS = [f"k{i}" for i in range(8)]  # seats 0..7: two groups of 4
SEAT_OF = {key: i for i, key in enumerate(KEYS)}


def seated(index: int, key: str, sent: float, answered: float, **times: float) -> Person:
    person = Person(index, f"label{index}", due=sent, sent=sent, answered=answered)
    person.outcome, person.key = "seated", key
    for name, value in times.items():
        setattr(person, name, value)
    return person


def full(index: int, sent: float, answered: float) -> Person:
    person = Person(index, f"label{index}", due=sent, sent=sent, answered=answered)
    person.outcome = "full"
    return person


def test_even_arrivals_are_evenly_spaced_within_the_window() -> None:
    times = arrival_schedule(1000, 10.0)
    assert len(times) == 1000
    assert times[0] == 0.0 and times[-1] < 10.0
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.01}


def test_poisson_arrivals_are_seeded_sorted_and_inside_the_window() -> None:
    times = arrival_schedule(1000, 10.0, "poisson", seed=3)
    assert times == arrival_schedule(1000, 10.0, "poisson", seed=3)
    assert times != arrival_schedule(1000, 10.0, "poisson", seed=4)
    assert times == sorted(times) and len(times) == 1000
    assert times[0] >= 0.0 and times[-1] < 10.0
    # Uniform over the window given the count: each second holds about 100 (seed fixed, so
    # this bound is a fact about this draw, not a flaky statistic).
    per_second = [sum(1 for t in times if s <= t < s + 1) for s in range(10)]
    assert all(60 <= n <= 140 for n in per_second), per_second
    assert arrival_schedule(5, 0.0, "poisson") == [0.0] * 5
    with pytest.raises(ValueError, match="arrivals"):
        arrival_schedule(5, 1.0, "burst")


def test_prolific_ids_are_distinct_24_hex_digits_and_seeded() -> None:
    ids = prolific_ids(1000, seed=1)
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert ids == prolific_ids(1000, seed=1) and ids != prolific_ids(1000, seed=2)


def test_params_refuse_seats_that_do_not_make_whole_groups() -> None:
    LaunchParams().check()
    with pytest.raises(ValueError, match="multiple"):
        LaunchParams(seats=10, group_size=4).check()
    with pytest.raises(ValueError, match="arrivals"):
        LaunchParams(arrivals="burst").check()


def test_arrival_order_violations_are_only_what_the_outside_can_prove() -> None:
    people = [
        seated(0, "k0", sent=0.0, answered=0.1),
        seated(1, "k1", sent=0.2, answered=0.3),
        # Overlapping requests (2 sent before 3 was answered and the other way round): the
        # store may have handled them in either order, so a lower seat for 3 is no violation.
        seated(2, "k3", sent=0.4, answered=0.6),
        seated(3, "k2", sent=0.5, answered=0.55),
        full(4, sent=0.7, answered=0.8),
    ]
    assert order_violations(people, SEAT_OF) == {"seat_after_full": 0, "seat_order": 0}
    # A seat lower than one already answered before this request left: out of order.
    late_low = seated(5, "k1", sent=1.0, answered=1.1)
    assert order_violations([*people[:3], late_low], SEAT_OF)["seat_order"] == 1
    # A seat for someone who asked after another's "full" came back: a seat appeared.
    after_full = seated(6, "k4", sent=0.9, answered=1.0)
    assert order_violations([*people, after_full], SEAT_OF) == {
        "seat_after_full": 1,
        "seat_order": 0,
    }
    # A "full" answered while a seated request was in flight proves nothing.
    assert order_violations(
        [full(7, sent=0.0, answered=0.5), seated(8, "k0", sent=0.4, answered=0.6)], SEAT_OF
    ) == {"seat_after_full": 0, "seat_order": 0}
    assert first_answered_seated(people, 4) == 4
    assert first_answered_seated([full(9, 0.0, 0.1), *people], 4) == 3


def test_seat_checks_find_keys_twice_unknown_keys_wrong_labels_and_gaps() -> None:
    detail = [{"key": k, "label": None} for k in KEYS]
    people = [seated(i, KEYS[i], sent=i, answered=i + 0.5) for i in range(4)]
    for i in range(4):
        detail[i]["label"] = f"label{i}"
    assert seat_checks(people, KEYS, detail) == {
        "keys_twice": 0,
        "unknown_keys": 0,
        "label_mismatch": 0,
        "orphan_labels": 0,
        "seats_out_of_order": 0,
    }
    twice = seated(9, "k1", sent=9, answered=9.5)  # a second person sent to seat 1
    gap = seated(10, "k6", sent=10, answered=10.5)  # seat 6 while 4 and 5 are free
    stranger = seated(11, "nope", sent=11, answered=11.5)
    detail[7]["label"] = "label99"  # a label on a seat nobody was sent to
    checks = seat_checks([*people, twice, gap, stranger], KEYS, detail)
    assert checks == {
        "keys_twice": 1,
        "unknown_keys": 1,
        # twice (seat 1 carries label1), gap (seat 6 has none), stranger (no such seat)
        "label_mismatch": 3,
        "orphan_labels": 1,
        "seats_out_of_order": 1,
    }


def test_a_group_forms_from_its_last_members_hello_to_its_period_start() -> None:
    people = [
        seated(0, "k0", sent=0.0, answered=0.01, hello=0.02, started=1.05),
        seated(1, "k1", sent=0.1, answered=0.11, hello=0.12, started=1.05),
        seated(2, "k2", sent=0.2, answered=0.21, hello=0.25, started=1.05),
        # The last to connect (hello at 1.0), though not the last to ask (3 asked before 2):
        seated(3, "k3", sent=0.15, answered=0.9, hello=1.0, started=1.04),
        # The second group is missing a member: never complete.
        seated(4, "k4", sent=0.3, answered=0.31, hello=0.32),
    ]
    formation = group_formation(people, SEAT_OF, 4)
    assert formation["complete"] == 1 and formation["started"] == 1
    assert formation["from_hello"] == [pytest.approx(0.04)]
    assert formation["from_join"] == [pytest.approx(1.05 - 0.2)]  # person 2 asked last


def test_the_summary_counts_and_is_ok_only_when_every_check_holds() -> None:
    params = LaunchParams(people=10, seats=8, group_size=4, within=1.0, grouping="fixed")
    people = [
        seated(i, KEYS[i], sent=i / 10, answered=i / 10 + 0.01, hello=i / 10 + 0.02)
        for i in range(8)
    ]
    for p in people:
        p.started = 0.9 if p.index < 4 else 0.78
        p.due = p.sent or 0.0
    people += [full(8, sent=0.8, answered=0.81), full(9, sent=0.9, answered=0.92)]
    detail: list[dict[str, Any]] = [{"key": k, "label": f"label{i}"} for i, k in enumerate(KEYS)]
    summary = summarize(people, params, KEYS, detail, start=0.0)
    assert summary["counts"] == {
        "people": 10,
        "seated": 8,
        "full": 2,
        "errors": 0,
        "hello": 8,
        "started": 8,
        "finished": 0,
        "groups_complete": 2,
        "groups_started": 2,
        "first_answered_seated": 8,
    }
    assert summary["ok"]
    assert summary["join_seat_ms"]["count"] == 8 and summary["join_seat_ms"]["p50"] == 10.0
    assert summary["join_full_ms"]["max"] == 20.0
    assert summary["group_formed_ms"]["count"] == 2
    assert summary["group_formed_ms"]["max"] == pytest.approx(580.0)  # group 0: 0.9 - 0.32
    assert summary["send_lag_ms"]["max"] == 0.0
    assert summary["arrivals_s"] == 0.9

    people[9].outcome, people[9].error = "error", "join HTTP 503"
    broken = summarize(people, params, KEYS, detail, start=0.0)
    assert not broken["ok"] and broken["error_kinds"] == {"join HTTP 503": 1}

    people[9].outcome, people[9].error = "full", None
    assert summarize(people, params, KEYS, detail, start=0.0)["ok"]
    detail[0]["label"] = "someone else"
    wrong_label = summarize(people, params, KEYS, detail, start=0.0)
    assert not wrong_label["ok"] and wrong_label["seat_checks"]["label_mismatch"] == 1

    result = {
        "params": asdict(params),
        **summary,
        "burst_s": 1.2,
        "processes": {"gateway": {"cpu_s": 0.5, "cpu_pct": 41.7, "rss_mib": 80.0}},
        "stack_cpu_s": 0.5,
        "stack_cpu_pct": 41.7,
        "machine_cpu": {"busy_pct": 60.0, "other_pct": 5.0},
        "rss_mib": {"gateway": {"before": 70.0, "after": 80.0}},
    }
    text = format_launch(result)
    assert "last hello -> period_start" in text and "keys twice 0" in text
    assert "gateway 0.50 s (42 %)" in text
