"""Two gateways on one stack: a group's members on different gateways see each other, a
participant who moves to another gateway replaces the older connection there, and the members
of a gateway that dies turn disconnected (heartbeats) and come back on the other one.

Decisions addresses broadcasts to the gateways that hold a group's members (learnt from their
inputs); these tests are what proves it beyond one gateway (horizontal scale-out)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from tests.e2e.conftest import Gateway, extra_gateway
from tests.e2e.protocol import Participant, create_session


@pytest.fixture
async def gateway_process(stack: Any) -> AsyncIterator[Gateway]:
    """Another gateway process on the test stack (a test may kill it)."""
    async with extra_gateway(stack) as gateway:
        yield gateway


@pytest.fixture
def second_gateway(gateway_process: Gateway) -> str:
    return gateway_process.url


async def test_members_on_different_gateways_see_each_other(
    api: httpx.AsyncClient, gateway_url: str, second_gateway: str
) -> None:
    session = await create_session(api, num_participants=3, group_size=3)
    codes = [p["code"] for p in session["participants"]]
    a = await Participant.connect(gateway_url, codes[0])
    b = await Participant.connect(second_gateway, codes[1])
    c = await Participant.connect(second_gateway, codes[2])
    for member in (a, b, c):
        await member.expect("hello")
        await member.expect("period_start")
    await a.send(1.5, seq=1)
    await a.ack(1)
    await b.send(2.5, seq=1)
    await b.ack(1)
    for member in (a, b, c):
        await member.expect("group_decisions", lambda d: d[codes[0]] == 1.5 and d[codes[1]] == 2.5)
    await c.close()
    presence = await a.expect("presence", lambda p: p["participant"] == codes[2])
    assert presence["connected"] is False
    await a.close()
    await b.close()


async def test_moving_to_another_gateway_replaces_the_older_connection(
    api: httpx.AsyncClient, gateway_url: str, second_gateway: str
) -> None:
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    a = await Participant.connect(gateway_url, codes[0])
    b = await Participant.connect(gateway_url, codes[1])
    for member in (a, b):
        await member.expect("hello")
        await member.expect("period_start")
    moved = await Participant.connect(second_gateway, codes[0])
    hello = await moved.expect("hello")
    assert hello["period"]["state"] == "running"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await a.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
    await b.send(3.5, seq=1)
    await b.ack(1)
    await moved.expect("group_decisions", lambda d: d[codes[1]] == 3.5)
    await moved.send(4.5, seq=1)
    await moved.ack(1)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 4.5)
    await moved.close()
    await b.close()


async def test_members_of_a_dead_gateway_turn_disconnected_and_come_back(
    api: httpx.AsyncClient, gateway_url: str, gateway_process: Gateway
) -> None:
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    a = await Participant.connect(gateway_process.url, codes[0])
    b = await Participant.connect(gateway_url, codes[1])
    for member in (a, b):
        await member.expect("hello")
        await member.expect("period_start")
    killed = time.monotonic()
    gateway_process.process.kill()  # SIGKILL: nobody publishes a's disconnect
    gateway_process.process.wait()
    await b.expect("presence", lambda p: p == {"participant": codes[0], "connected": False})
    noticed = time.monotonic() - killed
    assert noticed < 10  # the liveness timeout (3 s) plus a heartbeat check
    back = await Participant.connect(gateway_url, codes[0])
    hello = await back.expect("hello")
    assert hello["period"]["state"] == "running"
    await b.expect("presence", lambda p: p == {"participant": codes[0], "connected": True})
    await back.send(0.5, seq=1)
    await back.ack(1)
    await b.expect("group_decisions", lambda d: d[codes[0]] == 0.5)
    print(f"\npresence turned false {noticed:.2f} s after the gateway was killed")
    await back.close()
    await b.close()
