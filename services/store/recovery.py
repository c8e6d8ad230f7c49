"""Internal read-back of the event log for decisions workers that rebuild group state.

`GET /internal/barriers/{id}`: 200 once the store wrote a `LogBatch` carrying that barrier, so
everything published to the log before it is in MongoDB too (404 until then).
`GET /internal/groups/{group}/log`: the group's log in its one order, as a JSON array of
`{"ts", "participant", "direction", "channel", "seq", "value"}` (value as it was sent).
`GET /internal/lobbies/{session}/log`: the same for an arrival session's lobby (group "").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from services.common.errors import ApiError
from services.store.api import Tokens, bearer_auth
from services.store.repository import Repository

CHUNK = 500


def recovery_router(repository: Repository, token: Tokens) -> APIRouter:
    router = APIRouter(
        prefix="/internal", dependencies=[bearer_auth(token)], include_in_schema=False
    )

    @router.get("/barriers/{barrier}")
    async def barrier(barrier: str) -> dict[str, Any]:
        if not await repository.barrier_passed(barrier):
            raise ApiError(404, "not_found", "barrier not written yet")
        return {"barrier": barrier}

    @router.get("/groups/{group_id}/log")
    async def group_log(group_id: str) -> StreamingResponse:
        return StreamingResponse(
            _log_chunks(repository.group_events(group_id)), media_type="application/json"
        )

    @router.get("/lobbies/{session_id}/log")
    async def lobby_log(session_id: str) -> StreamingResponse:
        return StreamingResponse(
            _log_chunks(repository.lobby_events(session_id)), media_type="application/json"
        )

    return router


async def _log_chunks(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    yield b"["
    first, rows = True, []
    async for document in events:
        rows.append(
            orjson.dumps(
                {
                    "ts": document["ts"],
                    "participant": document.get("participant"),
                    "direction": document["direction"],
                    "channel": document["channel"],
                    "seq": document.get("seq"),
                    "value": orjson.Fragment(document["value"]),
                }
            )
        )
        if len(rows) >= CHUNK:
            yield (b"" if first else b",") + b",".join(rows)
            first, rows = False, []
    if rows:
        yield (b"" if first else b",") + b",".join(rows)
    yield b"]"
