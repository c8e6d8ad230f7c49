"""PROTOCOL v1.1 session settings end to end: on_disconnect end_period, post_period_delay,
carry_decisions false."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session

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


async def test_pause_is_refused_until_it_is_supported(api: httpx.AsyncClient) -> None:
    body = {
        "experiment": "decisions",
        "num_participants": 2,
        "group_size": 2,
        "period_length": 5,
        "on_disconnect": "pause",
    }
    response = await api.post("/api/sessions", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "on_disconnect"
