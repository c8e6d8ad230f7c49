"""The replay (PROTOCOL v1.1 "Replay", `GET /api/sessions/{session}/replay`): every group's
ended periods rebuilt from the event log and the session's own settings alone.

Each group's log is folded through the same state machine the decisions service runs
(`services.common.group.rebuild`), so the replay equals what was broadcast: the decisions at
each period's end, its payoffs, and each sub-period's snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from services.common.experiments import Registry
from services.common.group import rebuild
from services.store.domain import group_config
from services.store.repository import Repository


async def replay_session(
    repository: Repository, session: dict[str, Any], experiments: Registry
) -> dict[str, Any]:
    """`{"groups": [{"group", "periods": [...]}]}` for one session's document, its experiment
    from `experiments` (the store's)."""
    groups = {g["_id"]: g for g in await repository.session_groups(session["_id"])}
    result = []
    for group_id in session["groups"]:
        config = group_config(session, groups[group_id])
        rows = await _collect(repository.group_events(group_id))
        state = rebuild(config, experiments.get(config.experiment), rows)
        result.append({"group": group_id, "periods": state.history})
    return {"groups": result}


async def _collect(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**document, "value": orjson.loads(document["value"])} async for document in events]
