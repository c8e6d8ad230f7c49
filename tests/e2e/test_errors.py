"""Every participant error of PROTOCOL.md: the connection stays open and keeps working."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.e2e.protocol import Participant, connect_group, create_session, ws_url

pytestmark = [pytest.mark.e2e]


async def still_works(p: Participant, seq: int) -> None:
    await p.send(0.5, seq=seq)
    await p.ack(seq)
    await p.expect("group_decisions", lambda d: d[p.code] == 0.5)


async def test_frame_errors_keep_the_connection(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    a, b = await connect_group(gateway_url, [p["code"] for p in session["participants"]])
    cases: list[tuple[str | bytes, str, int | None]] = [
        ("{not json", "bad_json", None),
        ("[1, 2]", "bad_message", None),
        (json.dumps({"channel": "decisions", "seq": 5}), "bad_message", 5),
        (json.dumps({"channel": "decisions", "payload": 1, "seq": "x"}), "bad_message", None),
        (json.dumps({"channel": "decisions", "payload": 1, "seq": -3}), "bad_message", None),
        (b"\x00binary", "bad_message", None),
        (json.dumps({"channel": "chat", "payload": "hi", "seq": 6}), "unknown_channel", 6),
    ]
    for raw, code, seq in cases:
        await a.ws.send(raw)
        error = await a.error()
        assert (error["code"], error["seq"]) == (code, seq), raw
        assert error["message"]
    await a.send("not a number", seq=7)
    await a.ack(7)  # accepted and logged, then rejected by the experiment
    assert (await a.error(seq=7))["code"] == "invalid_decision"
    await still_works(a, seq=8)
    await a.close()
    await b.close()


async def test_period_not_running(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    a = await Participant.connect(gateway_url, session["participants"][0]["code"])
    await a.expect("hello")
    await a.send(0.3, seq=1)
    await a.ack(1)
    error = await a.error(seq=1)
    assert error["code"] == "period_not_running"
    await a.close()


async def test_flood_limit(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    a, b = await connect_group(gateway_url, [p["code"] for p in session["participants"]])
    for seq in range(1, 1001):
        await a.send(seq / 1000, seq=seq)
    outcomes: dict[int, str] = {}
    async with asyncio.timeout(30):
        while len(outcomes) < 1000:
            frame = await a.next()
            if frame["channel"] in ("ack", "error"):
                payload = frame["payload"]
                outcomes[payload["seq"]] = payload.get("code", "ack")
    accepted = sum(1 for o in outcomes.values() if o == "ack")
    assert accepted >= 100  # bursts of 100 pass
    assert set(outcomes.values()) == {"ack", "too_many_messages"}
    # The connection is still open and serves the next frame once the bucket refills.
    async with asyncio.timeout(10):
        seq = 1001
        while True:
            await a.send(0.5, seq=seq)
            reply = await a.reply(seq)
            if reply["channel"] == "ack":
                break
            assert reply["payload"]["code"] == "too_many_messages"
            seq += 1
    await a.close()
    await b.close()


async def test_sustained_50_per_second_passes(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    a, b = await connect_group(gateway_url, [p["code"] for p in session["participants"]])
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in range(1, 151):  # 3 s at 50 frames/s, paced by the clock
        await asyncio.sleep(max(0.0, start + seq / 50 - loop.time()))
        await a.send(seq / 1000, seq=seq)
    await a.ack(150)
    assert not [f for f in a.received if f["channel"] == "error"]
    await a.close()
    await b.close()


async def test_oversized_frame_closes_with_1009(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    a = await Participant.connect(gateway_url, session["participants"][0]["code"])
    await a.expect("hello")
    await a.ws.send(json.dumps({"channel": "decisions", "payload": "x" * 70_000, "seq": 1}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await a.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_unknown_code_is_refused(gateway_url: str) -> None:
    ws = await websockets.connect(ws_url(gateway_url, "0123456789abcdef0123"))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403


async def test_bad_experiment_params_are_refused_naming_the_field(api: httpx.AsyncClient) -> None:
    body = {
        "experiment": "bimatrix",
        "num_participants": 4,
        "group_size": 4,
        "period_length": 10,
        "params": {"payoff_matrix": [[[3, 1], [0, 5]], [[5, 0], [1, 1]]]},
    }
    response = await api.post("/api/sessions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "params.payoff_matrix"
    assert "symmetric" in error["message"]
    response = await api.post(
        "/api/sessions", json=body | {"experiment": "decisions", "params": {"x": 1}}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "params.x"
