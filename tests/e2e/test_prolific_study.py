"""A Prolific-style study end to end on the real stack (issue 19's "Done when"): one study link,
groups of 2 formed as people arrive, bots for the one left alone and for the one who leaves,
an end for everyone and a payments file that matches the session detail.

Nine people arrive through the study link with their `PROLIFIC_PID` over 20 s, in pairs (each
pair's second arrives right after the first, so which pairs form is known); one of them opens
the link a second time from another browser and gets the same seat; the ninth is left alone
and plays with a bot after `lobby_timeout`; one member leaves mid-period and a bot finishes for
them. Everyone connected at the end gets `finished` `completed` with the redirect holding their
label; the one who left gets `dropout` when they open their link again."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import httpx
import pytest
import websockets

from tests.e2e.protocol import TIMEOUT, Participant, create_session, raw_ws_url

pytestmark = [pytest.mark.e2e]

PEOPLE = 9
LABELS = [f"{i:024x}" for i in range(1, PEOPLE + 1)]  # Prolific ids: 24 hex digits
LEAVER = LABELS[7]  # the second of the fourth pair
ARRIVALS_OVER = 20.0  # seconds, as the launch
PERIOD = 6.0
COMPLETION = {
    "completed": {"url": "https://app.prolific.com/submissions/complete?cc=C0DE&pid={label}"},
    "dropout": {"code": "DROPPED"},
}


async def join(gateway_url: str, join_url: str, label: str) -> str:
    """Open the study link as a fresh browser would; the seat key it sends the person to."""
    async with httpx.AsyncClient(base_url=gateway_url) as browser:
        response = await browser.get(join_url, params={"PROLIFIC_PID": label})
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert "/p/" in location
    return location.rsplit("/p/", 1)[1]


async def person(gateway_url: str, key: str, label: str) -> Participant:
    ws = await websockets.connect(raw_ws_url(gateway_url, key), max_size=None)
    return Participant(label, ws)


async def test_a_prolific_study_from_the_study_link_to_the_payments_file(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        num_participants=12,
        group_size=2,
        period_length=PERIOD,
        grouping="arrival",
        lobby_timeout=4.0,
        on_lobby_timeout="bots",
        on_disconnect="bots",
        dropout_grace=1.0,
        label_param="PROLIFIC_PID",
        completion=COMPLETION,
        payment={"exchange_rate": 0.05, "show_up_fee": 1.5, "currency": "GBP"},
    )
    sid = session["session"]
    join_url = session["join_url"].split("/join/", 1)[1]
    join_path = f"/join/{join_url}"
    labels = LABELS

    keys: dict[str, str] = {}
    people: dict[str, Participant] = {}
    groups: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    gap = ARRIVALS_OVER / ((PEOPLE + 1) // 2)
    for index, label in enumerate(labels):
        if index % 2 == 0:  # a pair arrives every `gap` seconds
            await asyncio.sleep(max(0.0, started + gap * index / 2 - time.monotonic()))
        keys[label] = await join(gateway_url, join_path, label)
        people[label] = await person(gateway_url, keys[label], label)
        await people[label].expect("hello")
        if index == 2:
            # The third person opens the link again in another browser: the same seat, and
            # the newer connection replaces the older one (4409).
            assert await join(gateway_url, join_path, label) == keys[label]
            again = await person(gateway_url, keys[label], label)
            await again.expect("hello")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:  # what was on its way to the older one, then its close
                    await people[label].next()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
            people[label] = again
        if label == LEAVER:  # leaves mid-period, as soon as their group's period runs
            groups[label] = await people[label].expect("hello", lambda h: h["group"] is not None)
            await people[label].expect("period_start")
            await people[label].close()
    assert len(set(keys.values())) == PEOPLE  # one seat each

    # Everyone has their group: the pairs in order of arrival, the ninth with a bot.
    for label in labels:
        if label != LEAVER:
            groups[label] = await people[label].expect(
                "hello", lambda h: h["group"] is not None, timeout=15
            )
    for i in range(0, PEOPLE - 1, 2):
        first, second = groups[labels[i]], groups[labels[i + 1]]
        assert first["group"] == second["group"]
        assert first["id_in_group"] == 1 and second["id_in_group"] == 2
    alone = groups[labels[-1]]
    assert alone.get("bots") and len(alone["members"]) == 2

    # The member who left mid-period: a bot plays for them after the grace.
    leaver = LEAVER
    code = groups[leaver]["participant"]
    partner = people[labels[labels.index(leaver) - 1]]
    await partner.expect("presence", lambda p: p.get("bot") is True and p["participant"] == code)

    # The end: everyone connected gets `completed` and their own redirect.
    for label in labels:
        if label == leaver:
            continue
        finished = await people[label].expect("finished", timeout=PERIOD + ARRIVALS_OVER)
        assert finished["outcome"] == "completed"
        assert finished["redirect"] == (
            f"https://app.prolific.com/submissions/complete?cc=C0DE&pid={label}"
        )
    back = await person(gateway_url, keys[leaver], leaver)
    await back.expect("hello")
    left = await back.expect("finished")
    assert (left["outcome"], left["code"], left["redirect"]) == ("dropout", "DROPPED", None)

    # The payments file matches the session detail, seat by seat.
    async with asyncio.timeout(TIMEOUT):
        while True:
            detail = (await api.get(f"/api/sessions/{sid}")).json()
            if sum(p["outcome"] is not None for p in detail["participants"]) == PEOPLE:
                break
            await asyncio.sleep(0.05)
    by_label = {p["label"]: p for p in detail["participants"] if p["label"]}
    assert set(by_label) == set(labels)
    bot_seats = [p for p in detail["participants"] if p["bot"] and not p["label"]]
    assert len(bot_seats) == 1 and bot_seats[0]["outcome"] is None
    assert by_label[leaver]["bot"] is True and by_label[leaver]["outcome"] == "dropout"

    response = await api.get(f"/api/sessions/{sid}/payments", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["label"] for r in rows] == [
        p["label"] for p in detail["participants"] if p["label"] or p["outcome"]
    ]
    for row in rows:
        seat = by_label[row["label"]]
        assert row["outcome"] == seat["outcome"] and row["code"] == seat["code"]
        assert float(row["total_payoff"]) == pytest.approx(seat["total_payoff"])
        assert float(row["bonus"]) == round(max(0.0, seat["total_payoff"]) * 0.05, 2)
        assert (row["show_up_fee"], row["currency"]) == ("1.5", "GBP")
    prolific = (
        await api.get(f"/api/sessions/{sid}/payments", params={"format": "prolific"})
    ).text.splitlines()
    assert prolific == [
        f"{r['label']},{float(r['bonus']):.2f}" for r in rows if float(r["bonus"]) > 0
    ]
    for label in labels:
        if label != leaver:
            await people[label].close()
    await back.close()
