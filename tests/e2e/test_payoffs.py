"""Payoffs end to end: `period_end.payoffs` equals a recomputation from the export alone
(PROTOCOL v1.1 "Payoffs"), and the session detail gives each participant's per-period payoffs
and their total."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.e2e.protocol import connect_group, create_session, export_until, replay_until
from tests.unit.test_payoffs import recompute

pytestmark = [pytest.mark.e2e]


def rows_of(export: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            **r,
            "ts": datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp(),
            "seq": int(r["seq"]) if r["seq"] else None,
            "value": json.loads(r["value"]),
        }
        for r in export
    ]


async def test_period_payoffs_equal_the_export_and_the_session_detail(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, experiment="bimatrix", period_length=2, num_periods=2)
    codes = [p["code"] for p in session["participants"]]
    row, col = await connect_group(gateway_url, codes)
    for seq, (mine, theirs) in enumerate([(1.0, 0.0), (0.2, 0.9), (0.6, 0.6)], start=1):
        await row.send(mine, seq=seq)
        await row.ack(seq)
        await col.send(theirs, seq=seq)
        await col.ack(seq)
        await asyncio.sleep(0.1)  # decisions that hold for a while, not a synchronisation
    first = await row.expect("period_end", lambda p: p["period"] == 1)
    second = await row.expect("period_end", lambda p: p["period"] == 2, timeout=15)
    export = await export_until(
        api,
        session["session"],
        lambda r: sum(1 for x in r if x["channel"] == "period_end") == 2,
    )
    rows = rows_of(export)
    for end in (first, second):
        again = recompute(rows, codes, end["period"])
        assert end["payoffs"] == pytest.approx(again, rel=1e-5, abs=1e-6)
    # Period 2 kept period 1's last decisions (carry-over): both held the whole period.
    assert second["payoffs"][codes[0]] == pytest.approx(
        0.6 * 0.6 * 3 + 0.6 * 0.4 * 0 + 0.4 * 0.6 * 5 + 0.4 * 0.4 * 1
    )

    async with asyncio.timeout(10):
        while True:
            detail = (await api.get(f"/api/sessions/{session['session']}")).json()
            people = {p["code"]: p for p in detail["participants"]}
            if all(len(p["payoffs"]) == 2 for p in people.values()):
                break
            await asyncio.sleep(0.05)
    for code in codes:
        expected = {"1": first["payoffs"][code], "2": second["payoffs"][code]}
        assert people[code]["payoffs"] == pytest.approx(expected)
        assert people[code]["total_payoff"] == pytest.approx(sum(expected.values()))

    # The replay rebuilds both periods from the log: what was broadcast.
    replay = (await api.get(f"/api/sessions/{session['session']}/replay")).json()
    (group,) = replay["groups"]
    assert group["group"] == session["groups"][0]["group"]
    assert group["periods"] == [
        {
            "period": end["period"],
            "group_decisions": end["group_decisions"],
            "payoffs": end["payoffs"],
            "subperiods": [],
        }
        for end in (first, second)
    ]
    await row.close()
    await col.close()


async def test_replay_of_a_discrete_period_equals_its_broadcasts(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, experiment="bimatrix", period_length=1.5, num_subperiods=3)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(0.9, seq=1)
    await a.ack(1)
    await b.expect("subperiod", lambda p: p["index"] == 1)
    await b.send(0.1, seq=1)
    await b.ack(1)
    end = await a.expect("period_end")
    subperiods = a.seen("subperiod")
    assert [s["index"] for s in subperiods] == [1, 2, 3]
    mean = {c: sum(s["payoffs"][c] for s in subperiods) / 3 for c in codes}
    assert end["payoffs"] == pytest.approx(mean)
    replay = await replay_until(api, session["session"])
    (period,) = replay["groups"][0]["periods"]
    assert period["payoffs"] == end["payoffs"]
    assert period["group_decisions"] == end["group_decisions"]
    assert period["subperiods"] == [
        {"index": s["index"], "group_decisions": s["group_decisions"], "payoffs": s["payoffs"]}
        for s in subperiods
    ]
    await a.close()
    await b.close()


async def test_public_goods_end_to_end(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(
        api, experiment="public_goods", period_length=1, params={"endowment": 10, "mpcr": 0.5}
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    hello = a.seen("hello")[0]
    assert hello["group_decisions"] == dict.fromkeys(codes, 0)
    await a.send(11, seq=1)  # more than the endowment
    assert (await a.error(1))["code"] == "invalid_decision"
    await a.send(10, seq=2)
    await a.ack(2)
    end = await b.expect("period_end")
    # a gave 10 for (nearly) the whole period: a keeps 0 + 5, b keeps 10 + 5.
    assert end["payoffs"][codes[0]] == pytest.approx(5.0, abs=0.5)
    assert end["payoffs"][codes[1]] == pytest.approx(15.0, abs=0.5)
    await a.close()
    await b.close()
