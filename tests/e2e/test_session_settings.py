"""PROTOCOL v1.1 session settings end to end: on_disconnect end_period, post_period_delay,
carry_decisions false."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session, replay_until

pytestmark = [pytest.mark.e2e]


async def test_a_drop_ends_the_period_and_the_next_starts_after_the_delay_afresh(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="bimatrix",
        num_periods=2,
        period_length=30,
        on_disconnect="end_period",
        post_period_delay=1.0,
        carry_decisions=False,
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(0.9, seq=1)
    await a.ack(1)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 0.9)
    await b.close()
    end = await a.expect("period_end")  # at once, not after 30 s
    assert end["period"] == 1 and set(end["payoffs"]) == set(codes)
    assert end["group_decisions"][codes[0]] == 0.9

    b = await Participant.connect(gateway_url, codes[1])
    hello = await b.expect("hello")
    assert hello["period"]["number"] == 2 and hello["period"]["state"] == "waiting"
    back = time.monotonic()
    await a.expect("period_start", lambda p: p["period"] == 2)
    assert time.monotonic() - back >= 0.9  # post_period_delay
    # carry_decisions false: period 2 starts from the initial decisions, announced.
    await a.expect("group_decisions", lambda d: d == dict.fromkeys(codes, 0.5))
    detail = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert detail["on_disconnect"] == "end_period" and detail["post_period_delay"] == 1.0
    await a.close()
    await b.close()


async def test_pause_stops_the_clock_and_its_ticks_until_the_group_is_back(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api, experiment="bimatrix", period_length=3, num_subperiods=3, on_disconnect="pause"
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.expect("subperiod", lambda p: p["index"] == 1)
    await b.close()
    paused = await a.expect("period_paused")
    assert paused["period"] == 1 and 0 < paused["remaining"] <= 2.0
    await a.send(0.3, seq=1)
    assert (await a.error(1))["code"] == "period_not_running"
    await asyncio.sleep(0.4)  # a pause that lasts a while (not a synchronisation)
    b = await Participant.connect(gateway_url, codes[1])
    hello = await b.expect("hello")
    resumed = await a.expect("period_resumed")
    assert hello["period"]["state"] in ("paused", "running")
    end = await a.expect("period_end", timeout=10)
    order = [f["channel"] for f in a.received if f["channel"] != "presence"]
    after_pause = order[order.index("period_paused") :]
    # No tick while paused: sub-periods 2 and 3 came after the resumption.
    assert after_pause.index("period_resumed") < after_pause.index("subperiod")
    assert [p["index"] for p in a.seen("subperiod")] == [1, 2, 3]
    assert end["period"] == 1 and set(end["payoffs"]) == set(codes)
    detail = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert detail["on_disconnect"] == "pause"
    # The replay folds the pause the same way: the same payoffs.
    replay = await replay_until(api, session["session"])
    assert replay["groups"][0]["periods"][0]["payoffs"] == end["payoffs"]
    # It ends `remaining` seconds after the resumption, not at its first ends_at.
    resumed_ts = next(f["ts"] for f in a.received if f["channel"] == "period_resumed")
    end_ts = next(f["ts"] for f in a.received if f["channel"] == "period_end")
    assert resumed["ends_at"] == pytest.approx(resumed_ts + paused["remaining"], abs=1e-3)
    assert end_ts >= resumed["ends_at"] - 1e-3
    await a.close()
    await b.close()


async def test_continue_runs_the_period_on_when_a_member_drops(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, experiment="bimatrix", period_length=2)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await b.close()
    await a.expect("presence", lambda p: p == {"participant": codes[1], "connected": False})
    await a.send(0.2, seq=1)  # still running: accepted and applied
    await a.ack(1)
    await a.expect("group_decisions", lambda d: d[codes[0]] == 0.2)
    end = await a.expect("period_end")  # at its deadline, not before
    assert end["period"] == 1 and end["group_decisions"][codes[0]] == 0.2
    assert "period_paused" not in a.channels()
    await a.close()
