"""Two versions side by side (issue 23, "No silent dead letters"): a newer sender, one that
adds a field, talks to today's readers on the real stack, and nothing is lost.

During a rolling upgrade a newer gateway sends frames that it has already acknowledged to its
participant; an older decisions worker must apply them, not dead-letter them. A newer decisions
worker sends log batches whose records carry a field more; an older store must write them.
Both are published here as those newer senders would (same exchanges, routing keys, message
types), each with a field today's schema does not have. Before the fix, both went to
`canopy.dead` (`extra="forbid"`): the frame never reached the group, the row never the log.

The other half: a message of a newer MAJOR version is refused (its sender says that it
changed the meaning of what today's reader knows), dead-lettered loudly, and kept where an
operator sees it (`GET /api/dead-letters`), not applied.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import httpx
import orjson
import pytest

from services.common.bus import BATCH_TYPE, INPUTS, LOG, LOG_KEY, input_key, shard_queue
from services.common.messages import Envelope, LogBatch, LogRecord, MessageType, new_id
from tests.e2e.protocol import connect_group, create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]

TIMEOUT = 10.0


def shards(stack: Any) -> int:
    return int(stack.env.get("CANOPY_SHARDS", "1"))


async def publish(
    stack: Any, exchange: str, routing_key: str, body: bytes, message_id: str, kind: str | None
) -> None:
    """One message on the stack's broker, with confirms, as a service publishes it."""
    connection = await aio_pika.connect(stack.infra.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                type=kind,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key,
            mandatory=True,
        )


def newer_frame(session: dict[str, Any], code: str, seq: int, value: float) -> dict[str, Any]:
    """A FrameAccepted as a newer gateway would send it: today's fields and one more."""
    group = session["groups"][0]["group"]
    envelope = Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session=session["session"],
        group=group,
        participant=code,
        seq=seq,
        channel="decisions",
        connection=new_id(),
        gateway="canopy.gateway.newer",
        payload=value,
    )
    document: dict[str, Any] = envelope.model_dump(mode="json")
    document["trace"] = {"span": "a1b2", "sampled": True}  # the newer sender's field
    return document


async def dead_letters(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await api.get("/api/dead-letters", params={"limit": 1000})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["dead_letters"]
    return found


async def test_a_newer_senders_frame_and_log_rows_are_applied_and_written(
    stack: Any, api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, period_length=60, label="newer sender")
    group = session["groups"][0]
    codes = group["participants"]
    first, _ = members = await connect_group(gateway_url, codes)
    try:
        # A frame from a newer gateway, in a batch as gateways send them.
        frame = newer_frame(session, first.code, 1, 0.625)
        await publish(
            stack,
            INPUTS,
            input_key(group["group"], shards(stack), "batch"),
            orjson.dumps([frame]),
            new_id(),
            BATCH_TYPE,
        )
        # Applied: both members see it in the group's decisions.
        for member in members:
            await member.expect("group_decisions", lambda p: p.get(first.code) == 0.625)

        # A log batch from a newer decisions worker: a field more on the batch and the record.
        record = LogRecord(
            id=f"out:{new_id()}",
            ts=time.time(),
            session=session["session"],
            group=group["group"],
            participant=None,
            direction="out",
            channel="note",
            seq=None,
            value={"newer": True},
        )
        batch: dict[str, Any] = LogBatch(records=[record]).model_dump(mode="json")
        batch["producer"] = "decisions 9.9"
        batch["records"][0]["span"] = "c3d4"
        await publish(stack, LOG, LOG_KEY, orjson.dumps(batch), batch["id"], None)

        rows = await export_until(
            api,
            session["session"],
            lambda rows: (
                any(r["channel"] == "note" for r in rows)
                and any(r["seq"] == "1" for r in inbound(rows, first.code))
            ),
        )
        (note,) = [r for r in rows if r["channel"] == "note"]
        assert orjson.loads(note["value"]) == {"newer": True}
        (applied,) = inbound(rows, first.code)
        assert orjson.loads(applied["value"]) == 0.625

        # Nothing of theirs was dead-lettered.
        ids = {frame["id"], batch["id"]}
        kept = await dead_letters(api)
        assert not [d for d in kept if d["message_id"] in ids or frame["id"] in d["body"]]
    finally:
        for member in members:
            await member.close()


async def test_a_newer_major_version_is_refused_and_kept_as_a_dead_letter(
    stack: Any, api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, period_length=60, label="newer major")
    group = session["groups"][0]
    first, _ = members = await connect_group(gateway_url, group["participants"])
    try:
        frame = newer_frame(session, first.code, 1, 0.875)
        frame["version"] = 2  # a breaking change: today's reader cannot know what it means
        message_id = new_id()
        await publish(
            stack,
            INPUTS,
            input_key(group["group"], shards(stack), "batch"),
            orjson.dumps([frame]),
            message_id,
            BATCH_TYPE,
        )
        async with asyncio.timeout(TIMEOUT):
            while True:
                kept = [d for d in await dead_letters(api) if d["message_id"] == message_id]
                if kept:
                    break
                await asyncio.sleep(0.05)  # the store keeps it once decisions refused it
        (dead,) = kept
        queue = shard_queue(int(input_key(group["group"], shards(stack), "batch").split(".")[1]))
        assert dead["queue"] == queue
        assert dead["reason"] == "rejected"
        assert dead["exchange"] == INPUTS
        assert dead["routing_key"] == input_key(group["group"], shards(stack), "batch")
        assert "version 2" in dead["cause"], dead["cause"]
        assert dead["state"] == "dead"

        # Not applied: a frame of today's version after it is what the group shows.
        await first.send(0.25, seq=1)
        await first.ack(1)
        for member in members:
            await member.expect("group_decisions", lambda p: p.get(first.code) == 0.25)
        assert all(0.875 not in (p or {}).values() for p in first.seen("group_decisions"))
    finally:
        for member in members:
            await member.close()
