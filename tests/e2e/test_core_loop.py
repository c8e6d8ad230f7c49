"""The PROTOCOL.md flow end to end: session → connect → period → decisions → export."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.e2e.protocol import connect_group, create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]


async def test_whole_flow(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api, period_length=1.5)
    codes = [p["code"] for p in session["participants"]]
    assert len(set(codes)) == 2 and all(len(c) >= 16 for c in codes)  # ≥ 64 random bits
    # PROTOCOL v2: the link carries the seat's secret key, never the public code.
    first = session["participants"][0]
    assert first["url"].endswith(f"/p/{first['key']}") and first["code"] not in first["url"]
    a, b = await connect_group(gateway_url, codes)

    hello = a.received[0]
    assert hello["channel"] == "hello"
    assert hello["payload"] == {
        "participant": codes[0],
        "group": session["groups"][0]["group"],
        "id_in_group": 1,
        "members": codes,
        "group_decisions": {codes[0]: None, codes[1]: None},
        "period": {"number": 1, "state": "waiting", "ends_at": None},
        "last_seq": 0,
        "presence": {codes[0]: True, codes[1]: False},
    }
    (start,) = b.seen("period_start")
    assert start["period"] == 1 and start["length"] == 1.5

    for seq, value in enumerate([0.25, 0.5, 0.75], start=1):
        await a.send(value, seq=seq)
        await a.ack(seq)
        seen = await b.expect("group_decisions", lambda p, v=value: p[codes[0]] == v)
        assert seen == {codes[0]: value, codes[1]: None}

    end = await a.expect("period_end", timeout=5)
    assert end == {"period": 1, "group_decisions": {codes[0]: 0.75, codes[1]: None}, "payoffs": {}}
    period_end_frame = next(f for f in a.received if f["channel"] == "period_end")
    # Ends on the server's clock: not before ends_at, and promptly after it.
    assert start["ends_at"] <= period_end_frame["ts"] < start["ends_at"] + 0.5
    status = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert status["groups"][0]["period"]["number"] == 1

    rows = await export_until(
        api, session["session"], lambda r: any(x["channel"] == "period_end" for x in r)
    )
    decisions = inbound(rows, codes[0])
    assert [(r["seq"], json.loads(r["value"])) for r in decisions] == [
        ("1", 0.25),
        ("2", 0.5),
        ("3", 0.75),
    ]
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert all(r["ts"].endswith("Z") and len(r["ts"]) == 27 for r in rows)
    out = [r["channel"] for r in rows if r["direction"] == "out"]
    assert out.count("group_decisions") == 3 and out.count("period_start") == 1
    assert "hello" not in out and "ack" not in out
    await a.close()
    await b.close()


async def test_jsonl_export_and_session_listing(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api, label="jsonl")
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send({"any": ["json", 1]}, seq=1)
    await a.ack(seq=1)
    await a.error(seq=1)  # the plain `decisions` experiment wants numbers
    async with asyncio.timeout(10):  # the store writes in batches: poll until it is there
        while True:
            response = await api.get(
                f"/api/sessions/{session['session']}/events", params={"format": "jsonl"}
            )
            rows = [json.loads(line) for line in response.text.splitlines()]
            if any(x["direction"] == "in" for x in rows):
                break
            await asyncio.sleep(0.05)
    assert response.headers["content-type"].startswith("application/x-ndjson")
    frame = next(x for x in rows if x["direction"] == "in")
    assert frame["value"] == {"any": ["json", 1]}
    assert frame["seq"] == 1
    assert all(x["participant"] == "" for x in rows if x["channel"] == "presence")
    listing = (await api.get("/api/sessions")).json()["sessions"]
    mine = next(s for s in listing if s["session"] == session["session"])
    assert mine["label"] == "jsonl" and mine["connected"] == 2
    await a.close()
    await b.close()


async def test_api_errors(api: httpx.AsyncClient, stack: object) -> None:
    bad = {"experiment": "decisions", "num_participants": 3, "group_size": 2, "period_length": 10}
    for body, code in [
        ({**bad, "experiment": "nope", "num_participants": 2}, "unknown_experiment"),
        (bad, "invalid_request"),
        ({**bad, "num_participants": 2, "period_length": 0}, "invalid_request"),
    ]:
        response = await api.post("/api/sessions", json=body)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == code
    response = await api.post(
        "/api/sessions", content=b"{", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "JSON" in response.json()["error"]["message"]
    assert (await api.get("/api/sessions/nope")).json()["error"]["code"] == "not_found"
    async with httpx.AsyncClient(base_url=api.base_url) as anonymous:
        response = await anonymous.get("/api/sessions")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
