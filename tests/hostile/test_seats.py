"""Hostile participants against seats (PROTOCOL v2 "Seats" and "Limits"), on the real stack.

Each test is one finding of issue 18; each failed on the v1 code (noted per test):
- a member could take a groupmate's seat with the code every member receives;
- a key (a credential) could leak into another member's frames or page, the export or a log;
- the flood limit was per connection (a reconnect got a fresh bucket) and bad frames were free;
- a reconnect storm was never refused;
- a seq of 2^53 moved a participant's counter out of reach;
- every look-up of an unknown link cost the store a request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from services.common.directory import Directory, NotFound
from services.common.seats import new_key, well_formed
from tests.e2e.protocol import (
    connect_group,
    create_session,
    export_csv,
    export_until,
    inbound,
    raw_ws_url,
    ws_url,
)
from tests.hostile.conftest import gateway_process

pytestmark = [pytest.mark.e2e]


async def refusal(url: str, timeout: float = 10.0) -> int | None:
    """Open `url` expecting a refusal: HTTP 403 before the upgrade, or the close code sent."""
    try:
        ws = await websockets.connect(url, open_timeout=timeout)
    except websockets.InvalidStatus as exc:
        return 4403 if exc.response.status_code == 403 else exc.response.status_code
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    return None


def frame(payload: Any, seq: int, channel: str = "decisions") -> str:
    return json.dumps({"channel": channel, "payload": payload, "seq": seq})


# -- one's own seat only -----------------------------------------------------------------


async def test_a_groupmates_code_is_not_a_key(api: httpx.AsyncClient, gateway_url: str) -> None:
    """v1: `/ws/<groupmate's code>` replaced the groupmate's socket (4409) and acted for them
    (in a market: bought from them at the taker's own price). v2: refused like any unknown
    link, before anything reaches the group; the groupmate is not disturbed."""
    session = await create_session(
        api, experiment="double_auction", period_length=30, num_participants=2, group_size=2
    )
    buyer, seller = (p["code"] for p in session["participants"])
    members = await connect_group(gateway_url, [buyer, seller])
    hello = next(f["payload"] for f in members[0].received if f["channel"] == "hello")
    assert seller in hello["members"]  # the code every member receives …
    assert await refusal(raw_ws_url(gateway_url, seller)) == 4403  # … opens nothing
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(f"{gateway_url}/p/{seller}")
    assert page.status_code == 404 and seller not in page.text and buyer not in page.text
    # The seller's own connection is still theirs: it trades, nothing was replaced.
    seq = await members[1].send({"side": "ask", "price": 40, "quantity": 1}, channel="orders")
    await members[1].ack(seq)
    book = await members[0].expect("book", lambda b: b["asks"])
    assert book["asks"][0]["participant"] == seller
    # Nobody's presence changed: the refused attempt never reached the group.
    assert all(p["connected"] for p in members[0].seen("presence"))
    for member in members:
        await member.close()


# -- no key anywhere but its own seat's ----------------------------------------------------

EXPERIMENTS: list[tuple[str, dict[str, Any], list[tuple[str, Any]]]] = [
    ("decisions", {}, [("decisions", 3), ("decisions", 4)]),
    ("bimatrix", {}, [("decisions", 0.2), ("decisions", 0.9)]),
    ("public_goods", {}, [("decisions", 5), ("decisions", 10)]),
    (
        "double_auction",
        {},
        [("orders", {"side": "bid", "price": 50, "quantity": 2}), ("cancel", {"seq": 1})],
    ),
]


@pytest.mark.timeout(180)
async def test_no_member_ever_sees_another_members_key(
    api: httpx.AsyncClient, gateway_url: str, stack: Any
) -> None:
    """Every frame and page of a session of each built-in experiment, the export and the
    services' logs: another member's key appears nowhere (PROTOCOL v2: only in one's own link
    and the researchers' API)."""
    keys: set[str] = set()
    for experiment, params, moves in EXPERIMENTS:
        session = await create_session(
            api,
            experiment=experiment,
            params=params,
            num_participants=4,
            group_size=4,
            period_length=1.5,
            num_subperiods=0,
        )
        seats = {p["code"]: p["key"] for p in session["participants"]}
        keys |= set(seats.values())
        members = await connect_group(gateway_url, list(seats))
        for member in members:
            for channel, payload in moves:
                if experiment == "double_auction" and member is not members[0]:
                    side = "bid" if members.index(member) % 2 == 0 else "ask"
                    payload = (
                        {"side": side, "price": 50, "quantity": 1}
                        if channel == "orders"
                        else payload
                    )
                await member.send(payload, channel=channel)
        for member in members:
            await member.expect("period_end", timeout=15)
        async with httpx.AsyncClient(timeout=10) as http:
            pages = {
                code: (await http.get(f"{gateway_url}/p/{key}")).text for code, key in seats.items()
            }
        for member in members:
            seen = json.dumps(member.received) + pages[member.code]
            assert member.code in pages[member.code]  # the page is the member's own
            others = [key for code, key in seats.items() if code != member.code]
            assert not [k for k in others if k in seen], (experiment, member.code)
        for member in members:
            await member.close()
        await export_until(
            api, session["session"], lambda rows: any(r["channel"] == "period_end" for r in rows)
        )
        for fmt in ("csv", "jsonl"):
            exported = await api.get(
                f"/api/sessions/{session['session']}/events", params={"format": fmt}
            )
            assert not [k for k in seats.values() if k in exported.text], (experiment, fmt)
    logs = "".join(
        stack.log_path(name).read_text() for name in ("gateway", "store", "decisions", "timers")
    )
    assert not [k for k in keys if k in logs]


# -- flood limit per participant, every frame counts --------------------------------------


@pytest.fixture(scope="module")
async def slow_gateway(stack: Any) -> Any:
    """A gateway with a flood limit of 5 frames/s (bursts of 10) and 5 connections/minute."""
    overrides = {"CANOPY_MAX_FRAMES_PER_SECOND": "5", "CANOPY_MAX_CONNECTIONS_PER_MINUTE": "5"}
    async with gateway_process(stack, overrides) as url:
        yield url


async def replies(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The gateway's next `count` answers: acks and its own errors (the group's later
    `period_not_running` for an acknowledged frame, and other frames, skipped)."""
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        while len(found) < count:
            message = json.loads(await ws.recv())
            if message["channel"] == "ack" or (
                message["channel"] == "error" and message["payload"]["code"] != "period_not_running"
            ):
                found.append(message)
    return found


async def test_the_flood_limit_holds_across_reconnects(
    api: httpx.AsyncClient, slow_gateway: str
) -> None:
    """v1: each connection had a fresh bucket, so a reconnect bought another burst. v2: the
    participant's bucket is the same on the next connection."""
    session = await create_session(api, period_length=30)
    code = session["participants"][0]["code"]
    async with websockets.connect(ws_url(slow_gateway, code)) as ws:
        for seq in range(1, 11):  # the whole burst
            await ws.send(frame(1, seq))
        first = await replies(ws, 10)
    assert [m["channel"] for m in first].count("ack") == 10
    async with websockets.connect(ws_url(slow_gateway, code)) as ws:
        for seq in range(11, 21):
            await ws.send(frame(1, seq))
        second = await replies(ws, 10)
    refused = [m for m in second if m["channel"] == "error"]
    # The bucket refills 5 tokens/s: a reconnect within a second leaves at most ~5 of 10.
    assert len(refused) >= 3, second
    assert all(m["payload"]["code"] == "too_many_messages" for m in refused)


async def test_bad_frames_take_tokens_too(api: httpx.AsyncClient, slow_gateway: str) -> None:
    """v1: a bad frame cost no token, so a stream of them never touched the limit. v2: every
    frame takes a token; past the limit a bad frame is refused as a flood too."""
    session = await create_session(api, period_length=30)
    code = session["participants"][1]["code"]
    async with websockets.connect(ws_url(slow_gateway, code)) as ws:
        for _ in range(10):
            await ws.send("not json")
        for _ in range(20):
            await ws.send("still not json")
        await ws.send(frame(1, 1))
        answers = []
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await ws.recv())
                if message["channel"] in ("ack", "error"):
                    answers.append(message)
                    if message["payload"].get("seq") == 1:
                        break
    codes = [m["payload"]["code"] for m in answers]
    assert codes[:10] == ["bad_json"] * 10  # the burst: each answered as what it is
    assert answers[-1]["channel"] == "error" and codes[-1] == "too_many_messages"
    assert codes.count("too_many_messages") >= 15  # past it, floods whatever they hold


async def test_a_reconnect_storm_gets_4429(api: httpx.AsyncClient, slow_gateway: str) -> None:
    """v1: any number of connections. v2: past the window's count, close 4429; refused
    attempts do not count, and another seat is not affected."""
    session = await create_session(api, period_length=30)
    first, second = (p["code"] for p in session["participants"])
    for _ in range(5):
        async with websockets.connect(ws_url(slow_gateway, first)) as ws:
            await ws.recv()  # hello: accepted
    assert await refusal(ws_url(slow_gateway, first)) == 4429
    assert await refusal(ws_url(slow_gateway, first)) == 4429
    async with websockets.connect(ws_url(slow_gateway, second)) as ws:
        assert json.loads(await ws.recv())["channel"] == "hello"


# -- seq bounds --------------------------------------------------------------------------


async def test_a_seq_cannot_jump_out_of_reach(api: httpx.AsyncClient, gateway_url: str) -> None:
    """v1: seq 2^53 was acknowledged, and every later frame of the participant (2^53 + 1 is
    2^53 in JavaScript) was a duplicate, acknowledged and dropped. v2: a jump of more than
    1,000,000 above last_seq is a bad_message; the counter stays where it was."""
    session = await create_session(api, period_length=30)
    codes = [p["code"] for p in session["participants"]]
    member, other = await connect_group(gateway_url, codes)
    await member.send(0.5, seq=2**53)
    error = await member.error(2**53)
    assert error["code"] == "bad_message"
    await member.send(1, seq=1_000_001)  # 1,000,001 above last_seq 0: one too far
    assert (await member.error(1_000_001))["code"] == "bad_message"
    await member.send(2, seq=1_000_000)  # exactly the largest jump allowed
    await member.ack(1_000_000)
    await member.send(7, seq=1_000_001)  # now one above last_seq
    await member.ack(1_000_001)
    await other.expect("group_decisions", lambda d: d[member.code] == 7)
    rows = await export_until(api, session["session"], lambda rows: len(inbound(rows)) >= 2)
    assert [int(r["seq"]) for r in inbound(rows, member.code)] == [1_000_000, 1_000_001]
    for p in (member, other):
        await p.close()


# -- unknown links cost no look-up ---------------------------------------------------------


async def test_unknown_keys_cost_the_store_nothing() -> None:
    """v1: each `/ws/<random>` or `/p/<random>` cost a store request and a database look-up.
    v2: a key that does not verify is refused before any look-up, and one that verifies but
    names no seat is asked once."""
    secret = secrets.token_bytes(32)
    asked: list[str] = []

    def store(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "x"}})

    directory = Directory("http://store.test", "token")
    directory._client = httpx.AsyncClient(
        base_url="http://store.test", transport=httpx.MockTransport(store)
    )
    made_up = [secrets.token_urlsafe(24) for _ in range(1000)]
    assert not any(well_formed(key, secret) for key in made_up)
    unknown = new_key(secret)
    assert well_formed(unknown, secret)
    for _ in range(100):
        with pytest.raises(NotFound):
            await directory.seat(unknown)
    assert len(asked) == 1
    await directory.close()


async def test_a_page_for_a_code_or_a_made_up_key_holds_no_seat(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, period_length=30)
    code = session["participants"][0]["code"]
    async with httpx.AsyncClient(timeout=10) as http:
        for path in (code, secrets.token_urlsafe(24), "x" * 32):
            page = await http.get(f"{gateway_url}/p/{path}")
            assert page.status_code == 404
            assert all(p["code"] not in page.text for p in session["participants"])
    assert await refusal(raw_ws_url(gateway_url, code)) == 4403
    rows = await export_csv(api, session["session"])
    assert rows == []  # nobody connected: nothing reached the group
