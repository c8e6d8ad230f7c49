"""The store's pure side of online studies: which live status a logged `presence` or
`finished` row changes, a seat's status, and the payments file's rows, CSV and Prolific text."""

from __future__ import annotations

from typing import Any

from services.common.messages import LogRecord
from services.store.api import payment_rows, payments_csv, payments_prolific, seat_status
from services.store.handlers import status_updates


def row(channel: str, value: Any, participant: str | None = None, direction: str = "out") -> Any:
    return LogRecord(
        id="r1",
        ts=12.5,
        session="s",
        group="g",
        participant=participant,
        direction=direction,
        channel=channel,
        seq=None,
        value=value,
    )


def test_a_finished_row_sets_the_seats_outcome_and_when() -> None:
    value = {"outcome": "dropout", "total_payoff": 4.0, "redirect": None, "code": "X"}
    assert status_updates(row("finished", value, participant="p1")) == [
        ("participants", "p1", {"outcome": "dropout", "finished_at": 12.5})
    ]
    # A browser's frame on a channel of that name is no outcome.
    assert status_updates(row("finished", value, participant="p1", direction="in")) == []


def test_presence_marks_a_seat_seen_once_connected() -> None:
    assert status_updates(row("presence", {"participant": "p1", "connected": True})) == [
        ("participants", "p1", {"connected": True, "seen": True, "taken": True})
    ]
    assert status_updates(row("presence", {"participant": "p1", "connected": False})) == [
        ("participants", "p1", {"connected": False})
    ]


def test_seat_status() -> None:
    assert seat_status({}) == "unassigned"
    assert seat_status({"label": "x"}) == "unassigned"  # listed in `labels`, nobody came yet
    assert seat_status({"taken": True}) == "playing"
    assert seat_status({"seen": True}) == "playing"
    assert seat_status({"seen": True, "outcome": "completed"}) == "finished"
    # Arrival grouping: someone came, and the lobby has not given their seat a group yet.
    assert seat_status({"group": None, "taken": True}) == "lobby"
    assert seat_status({"group": None}) == "unassigned"
    assert seat_status({"group": "g1", "taken": True}) == "playing"


def test_payments_rows_csv_and_prolific_text() -> None:
    session: dict[str, Any] = {
        "payment": {"exchange_rate": 0.1, "show_up_fee": 1.5, "currency": "GBP"}
    }
    participants = [
        {"_id": "a", "label": "P,1", "outcome": "completed", "payoffs": {"1": 12.0, "2": 3.34}},
        {"_id": "b", "payoffs": {"1": 5.0}},  # no label, no outcome: not in the file
        {"_id": "c", "outcome": "dropout", "payoffs": {"1": -2.0}},  # no label
        {"_id": "d", "label": "P4", "payoffs": {}},  # a label, nothing earned
        {"_id": "e", "label": "P5", "outcome": "completed", "payoffs": {"1": 0.04}},
    ]
    rows = payment_rows(session, participants)
    assert [(r["code"], r["total_payoff"], r["bonus"]) for r in rows] == [
        ("a", 15.34, 1.53),
        ("c", -2.0, 0.0),
        ("d", 0, 0.0),
        ("e", 0.04, 0.0),
    ]
    assert payments_csv(rows).splitlines() == [
        "label,code,outcome,total_payoff,bonus,show_up_fee,currency",
        '"P,1",a,completed,15.34,1.53,1.5,GBP',
        ",c,dropout,-2.0,0.0,1.5,GBP",
        "P4,d,,0,0.0,1.5,GBP",
        "P5,e,completed,0.04,0.0,1.5,GBP",
    ]
    assert payments_prolific(rows) == "P,1,1.53\n"
    # Defaults: exchange rate 1, no show-up fee, no currency.
    plain = payment_rows({}, [{"_id": "x", "label": "L", "payoffs": {"1": 2.5}}])
    assert plain == [
        {
            "label": "L",
            "code": "x",
            "outcome": None,
            "total_payoff": 2.5,
            "bonus": 2.5,
            "show_up_fee": 0.0,
            "currency": None,
        }
    ]
    assert payments_prolific(plain) == "L,2.50\n"
