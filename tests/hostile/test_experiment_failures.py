"""Experiment code that fails never costs an acknowledged input (PROTOCOL v2 "The ack holds
through everything"), against the whole stack.

Found by hand on v1: bimatrix with `"params": {"game": null}` was accepted (201); every
decision of that session was acknowledged and then lost (its hook raised after the input
counted as seen, so each redelivery was a duplicate). Now such params are refused, and a hook
that raises on an input gives its `in` row, an `error` `experiment_error` row, and a group that
goes on. The failing plug-in is tests/plugins/site/canopy_fragile (installed for the stack's
services like canopy_min_effort): its `payoffs` raise whenever someone chooses 13.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.protocol import connect_group, create_session, export_until, replay_until

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("key", ["game", "payoff_matrix"])
async def test_a_null_param_is_refused(api: httpx.AsyncClient, key: str) -> None:
    body = {
        "experiment": "bimatrix",
        "num_participants": 2,
        "group_size": 2,
        "period_length": 5,
        "params": {key: None},
    }
    response = await api.post("/api/sessions", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == f"params.{key}"


async def test_params_are_stored_with_their_defaults(api: httpx.AsyncClient) -> None:
    session = await create_session(api, experiment="bimatrix", params={"game": "stag_hunt"})
    detail = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert detail["params"] == {"game": "stag_hunt", "initial_decision": 0.5}


async def test_an_input_a_hook_fails_on_is_kept_with_its_error(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, experiment="fragile", period_length=3)
    detail = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert detail["params"] == {"fail_on": 13}  # what the hook indexes: the default is there
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)

    await a.send(5, seq=1)
    await a.ack(1)
    await a.expect("group_decisions", lambda d: d == {codes[0]: 5, codes[1]: 0})
    await a.send(13, seq=2)  # the plug-in's payoffs raise on 13
    await a.ack(2)
    failed = await a.error(2)
    assert failed["code"] == "experiment_error"
    await a.send(7, seq=3)
    await a.ack(3)
    await b.send(20, seq=1)
    await b.ack(1)
    await a.expect("group_decisions", lambda d: d == {codes[0]: 7, codes[1]: 20})
    end = await a.expect("period_end")
    assert end["group_decisions"] == {codes[0]: 7, codes[1]: 20}
    assert 13 not in [v for d in a.seen("group_decisions") for v in d.values()]
    assert b.seen("error") == []  # the error is the sender's alone

    replay = await replay_until(api, session["session"])
    assert replay["groups"][0]["periods"][0]["payoffs"] == end["payoffs"]
    rows = await export_until(
        api, session["session"], lambda r: any(x["channel"] == "period_end" for x in r)
    )
    mine = [r for r in rows if r["participant"] == codes[0]]
    assert [(r["direction"], r["channel"], r["seq"]) for r in mine if r["seq"]] == [
        ("in", "decisions", "1"),
        ("in", "decisions", "2"),
        ("out", "error", "2"),
        ("in", "decisions", "3"),
    ]
    inputs = {r["seq"]: json.loads(r["value"]) for r in mine if r["direction"] == "in"}
    assert inputs == {"1": 5, "2": 13, "3": 7}
    error_row = next(r for r in mine if r["channel"] == "error")
    assert json.loads(error_row["value"])["code"] == "experiment_error"
    assert [r["channel"] for r in rows].count("period_start") == 1
    await a.close()
    await b.close()
