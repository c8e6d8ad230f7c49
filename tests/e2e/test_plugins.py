"""A session of a plug-in experiment end to end: tests/plugins/site holds the example package
(canopy_min_effort, found through its `canopy.experiments` entry point), which the test stack's
services have on their path, as if pip had installed it."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.protocol import connect_group, create_session, replay_until

pytestmark = [pytest.mark.e2e]


async def test_a_plug_in_experiment_runs_a_session(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    refused = await api.post(
        "/api/sessions",
        json={
            "experiment": "min_effort",
            "num_participants": 2,
            "group_size": 2,
            "period_length": 1,
            "params": {"max_effort": 1},
        },
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "params.max_effort"

    session = await create_session(
        api, experiment="min_effort", period_length=1.5, params={"max_effort": 5}
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    assert a.seen("hello")[0]["group_decisions"] == dict.fromkeys(codes, 1)
    await a.send(6, seq=1)  # above max_effort
    assert (await a.error(1))["code"] == "invalid_decision"
    await a.send(5, seq=2)
    await a.ack(2)
    await b.send(5, seq=1)
    await b.ack(1)
    await a.expect("group_decisions", lambda d: d == dict.fromkeys(codes, 5))
    end = await a.expect("period_end")
    # Both at 5 for most of the period: a·5 − b·5 + c = 11 per second at the end.
    assert 6.0 < end["payoffs"][codes[0]] <= 11.0
    replay = await replay_until(api, session["session"])
    assert replay["groups"][0]["periods"][0]["payoffs"] == end["payoffs"]
    await a.close()
    await b.close()
