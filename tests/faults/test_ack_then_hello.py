"""The ack holds through a resync (PROTOCOL v2 "The ack holds through everything"), step by step.

A decisions worker that took shards over (after a restart) asks every gateway to announce its
connections again (`Resync`): each connection's presence goes into its group's shard queue and
comes back from decisions as a fresh `hello`, built where that presence stands in the group's
order. The participant's frames keep going into the same queue behind it, and the gateway
acknowledges each as soon as the broker confirms it, before decisions gets to the presence.
Decisions' own `last_seq` in that hello is then below a seq already acknowledged on the same
connection: the SIGKILL fault of test_faults.py shows it by chance, this test every time. It
holds decisions (SIGSTOP) while it sends the `Resync` a restarted worker sends, has one frame
acknowledged, then lets decisions go on (SIGCONT): the hello that follows must say at least
that frame's seq.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aio_pika
import httpx
import pytest

from services.common.bus import GATEWAYS
from services.common.messages import Envelope, MessageType
from tests.e2e.protocol import connect_group, create_session
from tests.faults.test_faults import researcher

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TIMEOUT = 10.0


async def inputs_sent(client: httpx.AsyncClient) -> float:
    """Inputs (frames, presence) the gateway has handed to the broker so far: the sum of its
    `canopy_gateway_batch_items` histogram."""
    response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith("canopy_gateway_batch_items_sum "):
            return float(line.split()[1])
    raise AssertionError("no canopy_gateway_batch_items_sum in the gateway's metrics")


@pytest.mark.timeout(120)
async def test_a_resync_hello_says_at_least_what_was_acked_meanwhile(supervised: Any) -> None:
    gateway = supervised.urls["gateway"]
    async with researcher(supervised) as api:
        session = await create_session(api, period_length=60, label="ack then hello")
    group = session["groups"][0]
    first, second = members = await connect_group(gateway, group["participants"])
    connection = await aio_pika.connect(supervised.amqp_url)
    metrics = httpx.AsyncClient(base_url=gateway, timeout=TIMEOUT)
    try:
        channel = await connection.channel()
        await first.send(0.25, seq=1)
        await first.ack(1)
        await first.expect("group_decisions", lambda p: p[first.code] == 0.25)

        supervised.kill("decisions", signal.SIGSTOP)
        try:
            before = await inputs_sent(metrics)
            # What a worker that took the shards over sends (DecisionsWorker.request_resync).
            resync = Envelope(type=MessageType.RESYNC, session="", group="", payload={})
            exchange = await channel.get_exchange(GATEWAYS)
            await exchange.publish(
                aio_pika.Message(resync.encode(), message_id=resync.id), routing_key=""
            )
            # Both members announced again (the gateway publishes each presence once the one
            # before is confirmed): frame 2 goes into the queue behind its member's presence.
            async with asyncio.timeout(TIMEOUT):
                while True:
                    if await inputs_sent(metrics) >= before + len(members):
                        break
                    await asyncio.sleep(0.02)  # the gateway's metrics, polled
            # Behind the presence in the queue, and acknowledged on the broker's confirm.
            await first.send(0.75, seq=2)
            await first.ack(2)
        finally:
            supervised.kill("decisions", signal.SIGCONT)

        hello = await first.expect("hello")
        assert hello["last_seq"] >= 2, f"ack 2, then a hello with last_seq {hello['last_seq']}"
        # The frame is applied after the hello's snapshot, and its broadcast follows the hello.
        await first.expect("group_decisions", lambda p: p[first.code] == 0.75)
        assert (await second.expect("hello"))["last_seq"] == 0
    finally:
        await metrics.aclose()
        await connection.close()
        for member in members:
            await member.close()
