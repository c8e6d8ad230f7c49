"""The store's repository on the MongoDB-wire server: sessions, idempotent batches, export order."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common.messages import Envelope, MessageType, inbound_record
from services.store.domain import CreateSession, event_document, layout_session
from services.store.repository import Repository

pytestmark = [pytest.mark.integration]


@pytest.fixture
async def repository(infra: Any) -> AsyncIterator[Repository]:
    repository = Repository(infra.mongo_url, f"repo_{secrets.token_hex(4)}")
    await repository.setup()
    yield repository
    await repository.close()


async def test_session_layout_round_trip(repository: Repository) -> None:
    request = CreateSession(
        experiment="bimatrix", num_participants=6, group_size=3, period_length=60
    )
    layout = layout_session(request, "http://gw", b"k" * 32)
    await repository.create_session(layout)
    session_id = layout["session"]["_id"]
    stored = await repository.session(session_id)
    assert stored is not None and stored["experiment"] == "bimatrix"
    participants = await repository.session_participants(session_id)
    assert len(participants) == 6
    assert [p["id_in_group"] for p in participants] == [1, 2, 3, 1, 2, 3]
    assert len({p["_id"] for p in participants}) == 6
    group = await repository.group(participants[0]["group"])
    assert group is not None
    assert group["members"][0] == participants[0]["_id"]


async def test_batches_are_idempotent_and_export_is_ordered(repository: Repository) -> None:
    def doc(seq: int, ts: float, participant: str = "p") -> dict[str, Any]:
        document = event_document(
            inbound_record(
                Envelope(
                    type=MessageType.FRAME_ACCEPTED,
                    session="s",
                    group="g",
                    participant=participant,
                    seq=seq,
                    channel="decisions",
                    payload={"v": seq, "$odd.key": True},
                    ts=ts,
                )
            )
        )
        assert document is not None
        return document

    assert await repository.insert_events([doc(1, 1.0), doc(2, 2.0)]) == 2
    # A redelivered batch: the duplicates are dropped, the new event kept.
    assert await repository.insert_events([doc(2, 2.0), doc(3, 3.0), doc(1, 1.0)]) == 1
    await repository.insert_events([doc(1, 0.5, participant="q")])
    rows = [d async for d in repository.session_events("s")]
    assert [(d["participant"], d["seq"]) for d in rows] == [("q", 1), ("p", 1), ("p", 2), ("p", 3)]
    assert rows[0]["value"] == '{"v":1,"$odd.key":true}'
