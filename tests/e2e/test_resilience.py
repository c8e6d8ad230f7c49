"""Reconnect with resend (nothing lost, nothing twice), replacement (4409), presence."""

from __future__ import annotations

import httpx
import pytest
import websockets

from tests.e2e.protocol import (
    Participant,
    connect_group,
    create_session,
    export_until,
    inbound,
)

pytestmark = [pytest.mark.e2e]


async def test_reconnect_resend_is_logged_once(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(0.1, seq=1)
    await a.ack(1)
    # seq 2 goes out and the socket drops before any ack could be read: it may or may not
    # have been accepted; the client cannot know and must resend it.
    await a.send(0.2, seq=2)
    await a.ws.close()
    await b.expect("presence", lambda p: p == {"participant": codes[0], "connected": False})

    a = await Participant.connect(gateway_url, codes[0])
    hello = await a.expect("hello")
    assert hello["last_seq"] in (1, 2)
    assert hello["period"]["state"] == "running"
    await b.expect("presence", lambda p: p == {"participant": codes[0], "connected": True})
    for seq, value in [(1, 0.1), (2, 0.2), (2, 0.2)]:  # resend all; 1 is surely a duplicate
        await a.send(value, seq=seq)
        await a.ack(seq)
    await a.send(0.3, seq=3)
    await a.ack(3)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 0.3)

    rows = await export_until(api, session["session"], lambda r: len(inbound(r)) >= 3)
    assert [r["seq"] for r in inbound(rows, codes[0])] == ["1", "2", "3"]
    await a.close()
    await b.close()


async def test_duplicate_is_acknowledged_but_not_applied(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(0.4, seq=5)
    await a.ack(5)
    await a.send(0.9, seq=5)  # same seq, other value: a duplicate, not a new decision
    await a.ack(5)
    await a.send(0.6, seq=6)
    await a.ack(6)
    seen = await b.expect("group_decisions", lambda d: d[codes[0]] == 0.6)
    values = [f["payload"][codes[0]] for f in b.received if f["channel"] == "group_decisions"]
    assert 0.9 not in values and seen[codes[0]] == 0.6
    await a.close()
    await b.close()


async def test_newer_connection_replaces_older(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    a2 = await Participant.connect(gateway_url, codes[0])
    hello = await a2.expect("hello")
    assert hello["participant"] == codes[0] and hello["period"]["state"] == "running"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await a.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
    await a2.send(0.7, seq=1)
    await a2.ack(1)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 0.7)
    # A replacement is no presence change for the rest of the group.
    presence = [f["payload"] for f in b.received if f["channel"] == "presence"]
    assert {"participant": codes[0], "connected": False} not in presence
    await a2.close()
    await b.close()
