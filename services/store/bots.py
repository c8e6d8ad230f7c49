"""Bots the researcher console starts: "fill empty slots with bots", as oTree's browser bots.

Owns the routes `POST / GET / DELETE /api/sessions/{session}/bots` and the fleets they run
inside this store process (`services.bots.runner.start_bots`: the bots library speaks only
the public contract, so a bot here is a participant like any other, on a WebSocket to the
gateway through its participant link).

A fleet takes the session's open slots: participants not connected, and not already played
by a fleet of this process (a bot still connecting is not connected yet). Fleets end on their
own after the session's last period, or with DELETE, or when the store stops. They live in the
process that started them: with several store replicas, GET and DELETE answer for the replica
they reach (the console's requests go to one replica at a time; docs/console.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from services.bots.runner import BotFleet, open_slots, start_bots
from services.bots.strategies import STRATEGIES, StrategyError
from services.common.errors import ApiCode, ApiError
from services.common.experiments import Registry
from services.store.api import _documented as documented
from services.store.api import bearer_auth, session_summary, token_first_route
from services.store.domain import WholeNumber
from services.store.repository import Repository

log = logging.getLogger(__name__)


def _strategy_names(schema: JsonDict) -> None:
    schema["enum"] = list(STRATEGIES)


class StartBots(BaseModel):
    """Body of `POST /api/sessions/{session}/bots` (every field optional)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    strategy: str = Field(default="default", json_schema_extra=_strategy_names)
    rate: float = Field(default=1.0, ge=0, le=50)  # turns per second of each bot
    # Leave this many open slots for people (the first ones, in group order).
    all_but: WholeNumber = Field(default=0, ge=0, le=10_000)
    seed: WholeNumber | None = Field(default=None, ge=0, le=2**63 - 1)


class Fleets:
    """The fleets this process runs, per session."""

    def __init__(self) -> None:
        self._fleets: dict[str, list[BotFleet]] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def playing(self, session: str) -> set[str]:
        return {code for fleet in self._fleets.get(session, []) for code in fleet.codes}

    def add(self, session: str, fleet: BotFleet) -> None:
        self._fleets.setdefault(session, []).append(fleet)
        watcher = asyncio.get_running_loop().create_task(self._close_when_done(session, fleet))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _close_when_done(self, session: str, fleet: BotFleet) -> None:
        """A fleet whose bots all finished (the session's last period ended, or their slots
        were taken) closes its sockets: done bots must not hold connections for ever."""
        await fleet.wait_finished()
        await fleet.stop()
        fleets = self._fleets.get(session, [])
        if fleet in fleets:
            fleets.remove(fleet)
            if not fleets:
                del self._fleets[session]

    def status(self, session: str) -> dict[str, Any]:
        fleets = [f for f in self._fleets.get(session, []) if f.finished() < len(f.bots)]
        if fleets:
            self._fleets[session] = fleets
        else:
            self._fleets.pop(session, None)  # every bot done: nothing runs any more
        stats: dict[str, dict[str, int]] = {}
        for fleet in fleets:
            stats.update(fleet.stats())
        return {
            "session": session,
            "running": bool(fleets),
            "bots": sorted(stats),
            "strategy": ", ".join(sorted({f.strategy for f in fleets})),
            "connected": sum(f.connected() for f in fleets),
            "stats": stats,
        }

    async def stop(self, session: str) -> int:
        fleets = self._fleets.pop(session, [])
        for fleet in fleets:
            await fleet.stop()
        return sum(len(f.bots) for f in fleets)

    async def stop_all(self) -> None:
        for watcher in list(self._watchers):
            watcher.cancel()
        for session in list(self._fleets):
            await self.stop(session)


def bots_router(
    repository: Repository, fleets: Fleets, token: str, experiments: Registry | None = None
) -> APIRouter:
    """`experiments`: the store's registry, where the bots find a session's experiment (the
    built-ins alone when not given)."""
    registry = Registry.builtin() if experiments is None else experiments
    router = APIRouter(
        prefix="/api",
        dependencies=[bearer_auth(token)],
        route_class=token_first_route(token),
        responses=documented(401, 404, 422),
    )

    async def detail(session_id: str) -> dict[str, Any]:
        session = await repository.session(session_id)
        if session is None:
            raise ApiError(404, ApiCode.NOT_FOUND, f"no session {session_id[:100]!r}")
        return session_summary(
            session,
            await repository.session_groups(session_id),
            await repository.session_participants(session_id),
        )

    @router.post("/sessions/{session_id}/bots", status_code=201)
    async def start(
        session_id: str, request: Annotated[StartBots | None, Body()] = None
    ) -> dict[str, Any]:
        """Bots in the session's open slots (not connected, not played by a bot already)."""
        request = request or StartBots()
        session = await detail(session_id)
        taken = fleets.playing(session_id)
        free = [p for p in open_slots(session, all_but=request.all_but) if p["code"] not in taken]
        if not free:
            raise ApiError(
                422, ApiCode.INVALID_REQUEST, f"session {session_id}: no open slot for a bot"
            )
        try:
            fleet = await start_bots(
                [p["url"] for p in free],
                codes=[p["code"] for p in free],
                experiment=session["experiment"],
                params=dict(session.get("params") or {}),
                strategy=request.strategy,
                rate=request.rate,
                num_periods=int(session["num_periods"]),
                seed=request.seed,
                registry=registry,
            )
        except StrategyError as exc:  # the documented 422, with `field`: "strategy"
            error = {"loc": ("body", "strategy"), "msg": str(exc), "type": "value_error"}
            raise RequestValidationError([error]) from exc
        fleets.add(session_id, fleet)
        log.info("session %s: %d bots (%s)", session_id, len(fleet.bots), request.strategy)
        return fleets.status(session_id)

    @router.get("/sessions/{session_id}/bots")
    async def status(session_id: str) -> dict[str, Any]:
        """The bots this store process runs for the session, and their frame counts."""
        await detail(session_id)
        return fleets.status(session_id)

    @router.delete("/sessions/{session_id}/bots")
    async def stop(session_id: str) -> dict[str, Any]:
        """Stop the session's bots (their sockets close: they turn disconnected)."""
        await detail(session_id)
        stopped = await fleets.stop(session_id)
        return {**fleets.status(session_id), "stopped": stopped}

    return router
