"""Bots for dropouts (PROTOCOL v2 "Online studies", `on_disconnect: bots`) on the real stack: a
member away for `dropout_grace` seconds is played by a bot (`presence` with `"bot": true`; its
inputs are `in` rows without a seq), takes the seat back when they come back, and the group's
end says who was a person at the end."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session, export_until

pytestmark = [pytest.mark.e2e]


async def test_a_bot_plays_for_a_member_away_until_they_come_back(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        period_length=8,
        on_disconnect="bots",
        dropout_grace=0.5,
    )
    sid = session["session"]
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await b.close()
    left = await a.expect("presence", lambda p: p["participant"] == codes[1])
    assert left == {"participant": codes[1], "connected": False}
    bot = await a.expect("presence", lambda p: p["participant"] == codes[1])
    assert bot == {"participant": codes[1], "connected": True, "bot": True}
    # The bot plays b's seat: its inputs are in the log as b's, without a seq.
    await export_until(
        api, sid, lambda r: any(x["direction"] == "in" and x["seq"] == "" for x in r)
    )

    back = await Participant.connect(gateway_url, codes[1])
    hello = await back.expect("hello")
    assert hello["presence"][codes[1]] is True and "bots" not in hello
    person = await a.expect("presence", lambda p: p["participant"] == codes[1])
    assert person == {"participant": codes[1], "connected": True}

    finished = await back.expect("finished", timeout=15)
    assert finished["outcome"] == "completed"  # a person again at the end

    rows = await export_until(api, sid, lambda r: sum(x["channel"] == "finished" for x in r) == 2)
    bot_inputs = [r for r in rows if r["direction"] == "in" and r["seq"] == ""]
    assert bot_inputs and {r["participant"] for r in bot_inputs} == {codes[1]}
    took = next(
        i
        for i, r in enumerate(rows)
        if r["channel"] == "presence" and json.loads(r["value"]).get("bot")
    )
    returned = max(
        i
        for i, r in enumerate(rows)
        if r["channel"] == "presence" and json.loads(r["value"]) == person
    )
    positions = [rows.index(r) for r in bot_inputs]
    assert took < min(positions) and max(positions) < returned  # only while the bot played
    await a.close()
    await back.close()


async def test_a_member_still_played_by_a_bot_at_the_end_is_a_dropout(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        period_length=3,
        on_disconnect="bots",
        dropout_grace=0.3,
        completion={"dropout": {"code": "DROP"}},
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await b.close()
    await a.expect("presence", lambda p: p.get("bot") is True)
    mine = await a.expect("finished", timeout=15)
    assert mine["outcome"] == "completed"
    back = await Participant.connect(gateway_url, codes[1])
    await back.expect("hello")
    assert (await back.expect("finished"))["outcome"] == "dropout"
    await a.close()
    await back.close()
