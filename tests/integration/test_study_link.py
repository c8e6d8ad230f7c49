"""The study link's seat rules (PROTOCOL v2 "Online studies") on the real Repository against
the MongoDB-wire server: the same label always gets the same seat (also from concurrent
calls), a label listed in `labels` gets that seat, a new label the first free seat in group
order, a label-less browser its cookie's seat; no seat is given twice, and the rest is full.
Also the store's side of a seat's end: the payments rows and the session detail from the
participant documents that logged `presence` and `finished` rows update."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common.messages import LogRecord
from services.store.api import payment_rows, session_summary
from services.store.domain import CreateSession, layout_session
from services.store.handlers import status_updates
from services.store.repository import Repository

pytestmark = [pytest.mark.integration]

SECRET = b"k" * 32


@pytest.fixture
async def repository(infra: Any) -> AsyncIterator[Repository]:
    repository = Repository(infra.mongo_url, f"join_{secrets.token_hex(4)}")
    await repository.setup()
    yield repository
    await repository.close()


async def new_session(repository: Repository, seats: int, **settings: Any) -> dict[str, Any]:
    request = CreateSession(
        experiment="bimatrix",
        num_participants=seats,
        group_size=2,
        period_length=60,
        **settings,
    )
    layout = layout_session(request, "http://gw", SECRET)
    await repository.create_session(layout)
    return layout


def seat_order(layout: dict[str, Any]) -> list[str]:
    """Participant codes in group order: the session's groups in order, then id_in_group."""
    return [code for group in layout["groups"] for code in group["members"]]


async def test_a_label_keeps_its_seat_and_new_labels_take_seats_in_group_order(
    repository: Repository,
) -> None:
    layout = await new_session(repository, 6)
    session = layout["session"]["_id"]
    order = seat_order(layout)
    first = await repository.join(session, "alice", None)
    second = await repository.join(session, "bob", None)
    assert first is not None and second is not None
    assert [first["_id"], second["_id"]] == order[:2]
    again = await repository.join(session, "alice", None)
    assert again is not None and again["_id"] == first["_id"] and again["key"] == first["key"]
    assert (await repository.participant(first["_id"]) or {})["label"] == "alice"
    # The same label in another session is another person.
    other = await new_session(repository, 2)
    elsewhere = await repository.join(other["session"]["_id"], "alice", None)
    assert elsewhere is not None and elsewhere["_id"] == seat_order(other)[0]


async def test_a_label_listed_in_labels_gets_its_seat(repository: Repository) -> None:
    labels = ["p1", "p2", "p3", "p4"]
    layout = await new_session(repository, 4, labels=labels)
    session = layout["session"]["_id"]
    order = seat_order(layout)
    seat = await repository.join(session, "p3", None)
    assert seat is not None and seat["_id"] == order[2]
    again = await repository.join(session, "p3", None)
    assert again is not None and again["_id"] == order[2]
    # Every seat carries a listed label: an unlisted label finds none free.
    assert await repository.join(session, "stranger", None) is None
    assert await repository.join(session, None, None) is None


async def test_without_a_label_the_cookies_seat_comes_back(repository: Repository) -> None:
    layout = await new_session(repository, 4)
    session = layout["session"]["_id"]
    seat = await repository.join(session, None, None)
    assert seat is not None and seat["_id"] == seat_order(layout)[0]
    back = await repository.join(session, None, seat["key"])
    assert back is not None and back["_id"] == seat["_id"]
    # No cookie: the next free seat; a cookie of another session's seat counts as none.
    other = await new_session(repository, 2)
    foreign = other["participants"][0]["key"]
    fresh = await repository.join(session, None, foreign)
    assert fresh is not None and fresh["_id"] == seat_order(layout)[1]
    # A label never takes a seat a label-less browser holds.
    labelled = await repository.join(session, "carol", None)
    assert labelled is not None and labelled["_id"] == seat_order(layout)[2]


async def test_twenty_concurrent_labels_for_ten_seats_give_each_seat_once(
    repository: Repository,
) -> None:
    layout = await new_session(repository, 10)
    session = layout["session"]["_id"]
    labels = [f"person-{i}" for i in range(20)]
    seats = await asyncio.gather(*(repository.join(session, label, None) for label in labels))
    given = [s["_id"] for s in seats if s is not None]
    assert sorted(given) == sorted(seat_order(layout))  # every seat once
    assert sum(1 for s in seats if s is None) == 10  # the rest: full
    for label, seat in zip(labels, seats, strict=True):
        if seat is not None:
            assert (await repository.participant(seat["_id"]) or {})["label"] == label
            again = await repository.join(session, label, None)
            assert again is not None and again["_id"] == seat["_id"]


async def test_one_label_from_five_concurrent_calls_gets_one_seat(
    repository: Repository,
) -> None:
    layout = await new_session(repository, 10)
    session = layout["session"]["_id"]
    seats = await asyncio.gather(*(repository.join(session, "twice", None) for _ in range(5)))
    assert all(s is not None for s in seats)
    assert len({s["_id"] for s in seats if s is not None}) == 1
    participants = await repository.session_participants(session)
    assert [p.get("label") for p in participants].count("twice") == 1
    assert sum(1 for p in participants if p.get("taken")) == 1
    # The seats the losers claimed went back: the next label takes the first free seat.
    winner = seats[0]["_id"] if seats[0] else None
    following = await repository.join(session, "next", None)
    expected = next(code for code in seat_order(layout) if code != winner)
    assert following is not None and following["_id"] == expected


def record(channel: str, value: dict[str, Any], participant: str | None, ts: float) -> LogRecord:
    return LogRecord(
        id=secrets.token_hex(8),
        ts=ts,
        session="s",
        group="g",
        participant=participant,
        direction="out",
        channel=channel,
        seq=None,
        value=value,
    )


async def test_logged_presence_and_finished_rows_make_status_outcome_and_payments(
    repository: Repository,
) -> None:
    layout = await new_session(
        repository,
        4,
        labels=["L1", "L2", "L3", "L4"],
        payment={"exchange_rate": 0.5, "show_up_fee": 2, "currency": "GBP"},
    )
    session_id = layout["session"]["_id"]
    a, b, c, _ = seat_order(layout)
    end = record("period_end", {"period": 1, "payoffs": {a: 10.0, b: 3.0}}, None, 1.0)
    rows = [
        record("presence", {"participant": a, "connected": True}, None, 0.5),
        record("presence", {"participant": b, "connected": True}, None, 0.6),
        end,
        record("presence", {"participant": b, "connected": False}, None, 1.5),
        record(
            "finished",
            {"outcome": "completed", "total_payoff": 10.0, "redirect": None, "code": "C1"},
            a,
            2.0,
        ),
        record(
            "finished",
            {"outcome": "dropout", "total_payoff": 3.0, "redirect": None, "code": None},
            b,
            2.0,
        ),
    ]
    await repository.apply_status(u for r in rows for u in status_updates(r))
    await repository.join(session_id, "L3", None)  # c: given by the study link

    session = await repository.session(session_id)
    assert session is not None
    participants = await repository.session_participants(session_id)
    detail = session_summary(session, await repository.session_groups(session_id), participants)
    seats = {p["code"]: p for p in detail["participants"]}
    assert [(seats[code]["label"], seats[code]["status"], seats[code]["outcome"])
            for code in seat_order(layout)] == [
        ("L1", "finished", "completed"),
        ("L2", "finished", "dropout"),
        ("L3", "playing", None),
        ("L4", "unassigned", None),
    ]  # fmt: skip
    assert seats[a]["finished_at"] == "1970-01-01T00:00:02.000000Z"
    assert detail["join_url"] == f"http://gw/join/{detail['join_key']}"
    assert c in seats

    payments = payment_rows(session, participants)
    assert [(r["label"], r["outcome"], r["total_payoff"], r["bonus"]) for r in payments] == [
        ("L1", "completed", 10.0, 5.0),
        ("L2", "dropout", 3.0, 1.5),
        ("L3", None, 0, 0.0),
        ("L4", None, 0, 0.0),
    ]
    assert {(r["show_up_fee"], r["currency"]) for r in payments} == {(2.0, "GBP")}


async def test_a_seat_someone_played_is_never_given_to_a_newcomer(repository: Repository) -> None:
    """A seat connected through its own link (a person given it directly, or a bot filling
    an open slot) has a player: the study link must not hand it to a new label, who would take
    over that play and its payoffs (found writing docs/online-studies.md: a bot's finished
    seat went to a newcomer as `completed`)."""
    layout = await new_session(repository, 4)
    session = layout["session"]["_id"]
    order = seat_order(layout)
    played = LogRecord(
        id="presence-1",
        participant=None,
        seq=None,
        session=session,
        group=layout["groups"][0]["_id"],
        direction="out",
        channel="presence",
        value={"participant": order[0], "connected": True},
        ts=1.0,
    )
    await repository.apply_status(status_updates(played))
    seat = await repository.join(session, "newcomer", None)
    assert seat is not None and seat["_id"] == order[1]  # the next free one, not the played one


async def test_a_study_links_session_is_looked_up_once(repository: Repository) -> None:
    """Every arrival of a launch names its session by join key; a session document never
    changes, so the store asks the server once (docs/performance.md, "Study-link launch").
    An unknown key is asked again: its session may be created after."""
    unknown = "k" * 32
    assert await repository.session_by_join_key(unknown) is None
    layout = await new_session(repository, 2)
    join_key = layout["session"]["join_key"]
    first = await repository.session_by_join_key(join_key)
    assert first is not None and first["_id"] == layout["session"]["_id"]
    # Gone from the server (nothing in Canopy deletes a session; here only to tell a cached
    # answer from a fresh one), still known here.
    await repository.sessions.delete_one({"join_key": join_key})
    again = await repository.session_by_join_key(join_key)
    assert again is not None and again["_id"] == first["_id"]
    await repository.sessions.insert_one({"_id": "later", "join_key": unknown})
    later = await repository.session_by_join_key(unknown)
    assert later is not None and later["_id"] == "later"
