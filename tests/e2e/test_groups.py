"""Several groups at once, concurrent senders; rate limits and sub-periods."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]

SENDS = 25


async def test_four_groups_concurrent_senders(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api, num_participants=12, group_size=3)
    assert len(session["groups"]) == 4
    groups = [g["participants"] for g in session["groups"]]
    members = await asyncio.gather(*(connect_group(gateway_url, codes) for codes in groups))

    async def send_all(p: Participant) -> None:
        for seq in range(1, SENDS + 1):
            await p.send(seq / 100, seq=seq)
        await p.ack(SENDS)

    everyone = [p for group in members for p in group]
    await asyncio.gather(*(send_all(p) for p in everyone))
    final = {p.code: SENDS / 100 for p in everyone}
    for codes, group in zip(groups, members, strict=True):
        for p in group:
            latest = await p.expect(
                "group_decisions", lambda d, c=codes: all(d[x] == final[x] for x in c)
            )
            assert set(latest) == set(codes)  # nothing of other groups leaks in
            broadcasts = [f["payload"] for f in p.received if f["channel"] == "group_decisions"]
            assert all(set(d) == set(codes) for d in broadcasts)
            # Each member's own sequence of values only ever moves forward.
            for code in codes:
                seen = [d[code] for d in broadcasts if d[code] is not None]
                assert seen == sorted(seen)

    rows = await export_until(
        api, session["session"], lambda r: len(inbound(r)) >= SENDS * len(everyone)
    )
    for p in everyone:
        mine = inbound(rows, p.code)
        assert [int(r["seq"]) for r in mine] == list(range(1, SENDS + 1))
    for p in everyone:
        await p.close()


async def test_rate_limit_coalesces_but_keeps_the_last(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, rate_limit=0.3)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    for seq in range(1, 21):
        await a.send(seq / 20, seq=seq)
    await a.ack(20)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 1.0)
    broadcasts = [f for f in b.received if f["channel"] == "group_decisions"]
    assert len(broadcasts) < 20
    gaps = [y["ts"] - x["ts"] for x, y in itertools.pairwise(broadcasts)]
    assert all(gap >= 0.29 for gap in gaps)
    await a.close()
    await b.close()


async def test_subperiods_and_multiple_periods(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(
        api, experiment="bimatrix", period_length=1.0, num_subperiods=2, num_periods=2
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(1.0, seq=1)
    await a.ack(1)
    first = await b.expect("subperiod", lambda p: p["index"] == 1)
    second = await b.expect("subperiod", lambda p: p["index"] == 2)
    end = await b.expect("period_end")
    assert first["period"] == second["period"] == end["period"] == 1
    assert set(end["payoffs"]) == set(codes)
    assert second["group_decisions"][codes[0]] == 1.0
    # The next period starts by itself: everyone is still connected.
    start = await b.expect("period_start")
    assert start["period"] == 2
    await b.expect("period_end", lambda p: p["period"] == 2)
    rows = await export_until(
        api, session["session"], lambda r: sum(x["channel"] == "period_end" for x in r) == 2
    )
    assert [json.loads(r["value"])["index"] for r in rows if r["channel"] == "subperiod"] == [
        1,
        2,
        1,
        2,
    ]
    await a.close()
    await b.close()
