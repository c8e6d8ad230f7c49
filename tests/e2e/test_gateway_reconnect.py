"""A gateway whose broker connection is closed from the broker's side and comes back a few
seconds later (issue 23, "Partitions": the participants whose acks never resumed in
tests/cluster/test_partition.py), on the single-node stack.

The gateway under test is a process of its own whose AMQP connection goes through a TCP proxy
the test holds (`Door`): `rabbitmqctl close_connection` closes it, and the proxy refuses its
reconnects (as a paused node's closed listener does) until it is opened again. While it is
away its queue does not exist (exclusive, gone with its connection) and decisions publishes to
it without `mandatory`, so whatever decisions sends it meanwhile is dropped. Before the fix
nothing made up for that:
- a participant whose `hello` was sent while the queue was away never got one (a browser, and
  a bot, sends nothing until its hello: it waited for good, as in the cluster test);
- the members of a gateway away longer than decisions' liveness timeout (3 s) were
  disconnected by decisions while their sockets stayed open, and stayed disconnected: their
  group saw them gone and they got no broadcasts.
Now the gateway announces every open connection again once its connection is restored (each
gets a new hello and is connected again), and says it is not connected, refusing new sockets
with 1013, until every channel (its queue's consumer included) is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets
from yarl import URL

from tests.e2e.conftest import Gateway, extra_gateway
from tests.e2e.protocol import Participant, create_session, export_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AWAY = 20.0  # the longest a step after the heal may take


class Door:
    """A TCP proxy to the broker that can refuse new connections (closed at once, as a paused
    node's closed listener refuses them) while the ones already open go on as they were."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.refusing = True

    def heal(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self._target)
            self._writers.add(upstream)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


@dataclass
class ProxiedGateway:
    gateway: Gateway
    proxy: Door
    instance: str  # its queue is canopy.gateway.<instance>, its connection "gateway <instance>"


@asynccontextmanager
async def proxied_gateway(
    stack: Any, env: dict[str, str] | None = None
) -> AsyncIterator[ProxiedGateway]:
    url = URL(stack.infra.service_amqp_url("gateway"))
    assert url.host is not None and url.port is not None
    proxy = Door(url.host, url.port)
    await proxy.start()
    instance = f"reconnect-{secrets.token_hex(3)}"
    overrides = {"CANOPY_AMQP_URL": str(url.with_port(proxy.port)), "CANOPY_INSTANCE": instance}
    try:
        async with extra_gateway(stack, overrides | (env or {})) as gateway:
            yield ProxiedGateway(gateway, proxy, instance)
    finally:
        await proxy.close()


async def take_away(infra_handle: Any, gateway: ProxiedGateway) -> None:
    """Close the gateway's broker connection from the broker's side, keep it from coming
    back until `gateway.proxy.heal()`, and return once its queue is gone."""

    def close() -> None:
        listed = infra_handle.rabbitmqctl("list_connections", "-q", "pid", "client_properties")
        name = f'"gateway {gateway.instance}"'
        pids = [line.split()[0] for line in listed.stdout.splitlines() if name in line]
        assert len(pids) == 1, listed.stdout
        gateway.proxy.cut()  # its reconnects are refused from now on
        closed = infra_handle.rabbitmqctl("close_connection", pids[0], "test: gateway away")
        assert closed.returncode == 0, closed.stdout

    def queue_gone() -> bool:
        listed = infra_handle.rabbitmqctl("list_queues", "-q", "name")
        return f"canopy.gateway.{gateway.instance}" not in listed.stdout.split()

    await asyncio.to_thread(close)
    async with asyncio.timeout(AWAY):
        while True:  # the broker's own state: there is no event to wait on
            if await asyncio.to_thread(queue_gone):
                return
            await asyncio.sleep(0.1)


async def refused(gateway_url: str, code: str) -> int | None:
    """Open a socket that the gateway closes at once; the close code."""
    member = await Participant.connect(gateway_url, code)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await member.next()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def served(gateway_url: str, code: str) -> Participant:
    """A socket opened as the page's client does it: one closed at once with 1013 (the gateway
    is not connected to the broker) is opened again after a pause (canopy.js: 250 ms, the
    first of its backoffs). Returns once it has its hello."""
    async with asyncio.timeout(AWAY):
        while True:
            member = await Participant.connect(gateway_url, code)
            try:
                await member.expect("hello")
            except websockets.ConnectionClosed as closed:
                code_seen = closed.rcvd.code if closed.rcvd is not None else None
            else:
                return member
            assert code_seen == 1013, f"closed with {code_seen} before its hello"
            await asyncio.sleep(0.25)


def presence_rows(rows: list[dict[str, str]], code: str, connected: bool) -> int:
    values = [json.loads(r["value"]) for r in rows if r["channel"] == "presence"]
    return sum(v == {"participant": code, "connected": connected} for v in values)


async def test_members_of_a_gateway_that_was_away_are_connected_again(
    api: httpx.AsyncClient, stack: Any, infra_handle: Any, gateway_url: str
) -> None:
    """Away for longer than decisions' liveness timeout: its member's open socket is connected
    again once it is back, and a participant who came while it was away is served then."""
    session = await create_session(api, num_participants=3, group_size=3)
    a, b, c = [p["code"] for p in session["participants"]]
    async with proxied_gateway(stack) as away:
        on_away = away.gateway.url
        member_b = await Participant.connect(gateway_url, b)  # on the stack's own gateway
        await member_b.expect("hello")
        member_a = await Participant.connect(on_away, a)
        await member_a.expect("hello")

        await take_away(infra_handle, away)
        # Decisions hears no heartbeat from it and disconnects its member (liveness, 3 s).
        await member_b.expect("presence", lambda p: p == {"participant": a, "connected": False})
        # A participant who comes meanwhile is told to try again (nothing could be confirmed).
        assert await refused(on_away, c) == 1013

        away.proxy.heal()
        member_c = await served(on_away, c)
        await member_a.expect("hello", timeout=AWAY)  # a new one, on the same socket
        await member_b.expect("presence", lambda p: p == {"participant": a, "connected": True})
        for member in (member_a, member_b, member_c):  # all three connected: it starts
            await member.expect("period_start")
        await member_b.send(0.3, seq=1)
        await member_b.ack(1)
        for member in (member_a, member_c):
            await member.expect("group_decisions", lambda d: d[b] == 0.3)
        await member_a.send(0.7, seq=1)
        await member_a.ack(1)
        await member_b.expect("group_decisions", lambda d: d[a] == 0.7)
        for member in (member_a, member_b, member_c):
            await member.close()


async def test_a_hello_sent_while_the_gateway_queue_was_away_comes_again(
    api: httpx.AsyncClient, stack: Any, infra_handle: Any
) -> None:
    """The cluster test's stall, step by step: a socket accepted, its presence confirmed, and
    the gateway's connection gone before decisions' `hello` could reach its queue. Decisions is
    held (SIGSTOP) so that its hello leaves while the queue is away; before the fix the
    participant never got one."""
    session = await create_session(api, num_participants=1, group_size=1)
    (a,) = [p["code"] for p in session["participants"]]
    decisions = stack.processes["decisions"]
    # A frame sent before the hello is published after this long without it, and acknowledged:
    # its ack tells the test that the presence before it was confirmed.
    async with proxied_gateway(stack, {"CANOPY_HELLO_TIMEOUT": "0.2"}) as away:
        os.kill(decisions.pid, signal.SIGSTOP)
        try:
            member = await Participant.connect(away.gateway.url, a)
            await member.send(0.5, seq=1)
            await member.ack(1)
            await take_away(infra_handle, away)
        finally:
            os.kill(decisions.pid, signal.SIGCONT)
        # Decisions took the presence (the log says so): its hello went to no queue.
        await export_until(api, session["session"], lambda r: presence_rows(r, a, True) >= 1)

        away.proxy.heal()
        hello = await member.expect("hello", timeout=AWAY)
        assert hello["last_seq"] == 1
        await member.close()
