"""The arrival lobby (PROTOCOL v2 "The lobby") on the real stack: people who arrive one by one
wait in the lobby (`hello` with no group, `lobby` counts), the longest-waiting `group_size`
form a group in order of arrival, each gets the group's `hello` and the group runs as a fixed
one; someone who leaves keeps their place; at their deadline a person is released with outcome
`lobby_timeout`; every lobby event is an `out` row with the group ""."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.protocol import TIMEOUT, Participant, create_session, export_until

pytestmark = [pytest.mark.e2e]


async def detail_until(
    api: httpx.AsyncClient, session: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The session detail, polled (bounded) until `done` holds: the store takes a seat's
    status from the log, which it writes in batches."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            detail: dict[str, Any] = (await api.get(f"/api/sessions/{session}")).json()
            if done(detail):
                return detail
            await asyncio.sleep(0.05)


def seats(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["code"]: p for p in detail["participants"]}


async def arrive(gateway_url: str, code: str) -> tuple[Participant, dict[str, Any]]:
    """Open a seat's socket; its lobby `hello`."""
    person = await Participant.connect(gateway_url, code)
    hello = await person.expect("hello")
    return person, hello


async def test_people_wait_then_form_groups_in_order_of_arrival(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api, num_participants=4, group_size=2, period_length=30, grouping="arrival"
    )
    sid = session["session"]
    codes = [p["code"] for p in session["participants"]]
    assert all(p["group"] is None and p["id_in_group"] is None for p in session["participants"])
    assert all(g["participants"] == [] for g in session["groups"])

    # The second seat arrives first: seats are not groups, arrival order is.
    first, hello = await arrive(gateway_url, codes[1])
    assert hello["group"] is None and hello["id_in_group"] is None
    assert hello["members"] == [] and hello["period"]["state"] == "lobby"
    count = await first.expect("lobby")
    assert count["waiting"] == 1 and count["group_size"] == 2
    assert count["timeout_at"] == pytest.approx(time.time() + 300, abs=30)

    # A decision from the lobby is refused (not acknowledged: there is no group to log it).
    await first.send(5, seq=1)
    reply = await first.reply(1)
    assert reply["channel"] == "error"
    assert reply["payload"]["code"] == "period_not_running"

    detail = await detail_until(api, sid, lambda d: seats(d)[codes[1]]["status"] == "lobby")
    assert seats(detail)[codes[0]]["status"] == "unassigned"
    assert seats(detail)[codes[1]]["lobby_since"]

    second, _ = await arrive(gateway_url, codes[3])
    group_hellos = []
    for person in (first, second):
        group_hello = await person.expect("hello", lambda h: h["group"] is not None)
        group_hellos.append(group_hello)
        await person.expect("period_start")
    group = group_hellos[0]["group"]
    assert group_hellos[0]["members"] == [codes[1], codes[3]]  # first to arrive is id 1
    assert [h["id_in_group"] for h in group_hellos] == [1, 2]
    assert group_hellos[1]["group"] == group
    assert group == session["groups"][0]["group"]  # the session's groups, in order

    # The group runs as a fixed one.
    await second.send(7, seq=1)
    await second.ack(1)
    decisions = await first.expect("group_decisions", lambda d: d.get(codes[3]) == 7)
    assert decisions[codes[3]] == 7

    detail = await detail_until(api, sid, lambda d: seats(d)[codes[3]]["status"] == "playing")
    assert seats(detail)[codes[1]]["group"] == group
    assert seats(detail)[codes[1]]["id_in_group"] == 1
    assert detail["groups"][0]["participants"] == [codes[1], codes[3]]

    rows = await export_until(api, sid, lambda r: any(x["channel"] == "group_formed" for x in r))
    lobby_rows = [r for r in rows if r["group"] == ""]
    assert [(r["channel"], r["participant"]) for r in lobby_rows] == [
        ("lobby_join", codes[1]),
        ("lobby_join", codes[3]),
        ("group_formed", ""),
    ]
    assert all(r["direction"] == "out" for r in lobby_rows)
    assert json.loads(lobby_rows[-1]["value"]) == {"group": group, "members": [codes[1], codes[3]]}
    # The replay folds the groups formed so far (and the others, empty, as they are).
    replay = await api.get(f"/api/sessions/{sid}/replay")
    assert replay.status_code == 200, replay.text
    for person in (first, second):
        await person.close()


async def test_someone_who_leaves_keeps_their_place(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api, num_participants=4, group_size=2, period_length=30, grouping="arrival"
    )
    codes = [p["code"] for p in session["participants"]]
    a, _ = await arrive(gateway_url, codes[0])
    await a.expect("lobby")
    await a.close()
    b, _ = await arrive(gateway_url, codes[1])
    count = await b.expect("lobby")
    assert count["waiting"] == 1  # a left: one waits now
    c, _ = await arrive(gateway_url, codes[2])
    # b and c form the group (a is away); a comes back to the lobby and waits for the next.
    hello_b = await b.expect("hello", lambda h: h["group"] is not None)
    assert hello_b["members"] == [codes[1], codes[2]]
    await c.expect("hello", lambda h: h["group"] is not None)
    a, hello_a = await arrive(gateway_url, codes[0])
    assert hello_a["period"]["state"] == "lobby"
    d, _ = await arrive(gateway_url, codes[3])
    hello_a = await a.expect("hello", lambda h: h["group"] is not None)
    assert hello_a["members"] == [codes[0], codes[3]]  # a arrived first: id 1
    for person in (a, b, c, d):
        await person.close()


async def test_a_person_whose_time_runs_out_is_released(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        num_participants=2,
        group_size=2,
        period_length=30,
        grouping="arrival",
        lobby_timeout=1.0,
        labels=["P-1", "P-2"],
        completion={"lobby_timeout": {"url": "https://example.org/wait?pid={label}"}},
    )
    sid = session["session"]
    code = session["participants"][0]["code"]
    person, _ = await arrive(gateway_url, code)
    count = await person.expect("lobby")
    finished = await person.expect("finished", timeout=15)
    assert time.time() >= count["timeout_at"] - 0.05
    assert finished == {
        "outcome": "lobby_timeout",
        "total_payoff": 0.0,
        "redirect": "https://example.org/wait?pid=P-1",
        "code": None,
    }
    await person.close()

    rows = await export_until(api, sid, lambda r: any(x["channel"] == "finished" for x in r))
    assert [(r["channel"], r["group"]) for r in rows] == [
        ("lobby_join", ""),
        ("lobby_timeout", ""),
        ("finished", ""),
    ]
    detail = await detail_until(api, sid, lambda d: d["participants"][0]["outcome"] is not None)
    seat = detail["participants"][0]
    assert (seat["status"], seat["outcome"]) == ("finished", "lobby_timeout")

    # Back later: the lobby's hello, then the end again; never a group.
    back, hello = await arrive(gateway_url, code)
    assert hello["period"]["state"] == "lobby"
    assert await back.expect("finished") == finished
    await back.close()


async def test_with_bots_a_person_whose_time_runs_out_plays_with_bots_in_free_seats(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        num_participants=4,
        group_size=2,
        period_length=3,
        grouping="arrival",
        lobby_timeout=1.0,
        on_lobby_timeout="bots",
    )
    sid = session["session"]
    codes = [p["code"] for p in session["participants"]]
    person, _ = await arrive(gateway_url, codes[2])
    hello = await person.expect("hello", lambda h: h["group"] is not None, timeout=15)
    bot = codes[0]  # the first free seat in seat order
    assert hello["members"] == [codes[2], bot] and hello["bots"] == [bot]
    assert hello["presence"] == {codes[2]: True, bot: True}
    await person.expect("period_start")
    finished = await person.expect("finished", timeout=15)
    assert finished["outcome"] == "completed"

    rows = await export_until(api, sid, lambda r: any(x["channel"] == "finished" for x in r))
    played = [r for r in rows if r["direction"] == "in" and r["participant"] == bot]
    assert played and all(r["seq"] == "" for r in played), [
        (r["channel"], r["participant"], r["seq"]) for r in rows
    ]
    formed = next(json.loads(r["value"]) for r in rows if r["channel"] == "group_formed")
    assert formed == {"group": hello["group"], "members": [codes[2], bot], "bots": [bot]}
    assert not [r for r in rows if r["channel"] == "finished" and r["participant"] == bot]
    detail = await detail_until(api, sid, lambda d: seats(d)[codes[2]]["outcome"] is not None)
    assert seats(detail)[bot]["bot"] is True and seats(detail)[codes[2]]["bot"] is False
    assert seats(detail)[bot]["outcome"] is None  # nobody to pay
    await person.close()


async def test_with_bots_and_no_free_seat_a_person_is_released(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        num_participants=2,
        group_size=2,
        grouping="arrival",
        lobby_timeout=0.5,
        on_lobby_timeout="bots",
        labels=["L1", "L2"],  # every seat is someone's: none is free for a bot
    )
    person, _ = await arrive(gateway_url, session["participants"][0]["code"])
    finished = await person.expect("finished", timeout=15)
    assert finished["outcome"] == "lobby_timeout"
    await person.close()
