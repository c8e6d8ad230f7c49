"""Look-ups of sessions' immutable facts, answered by the store over HTTP and cached.

The gateway asks "who is participant <code>?" when a WebSocket opens; decisions asks "how is
group <id> configured?" before it handles the group's first message. Both answers never change
once a session exists, so they are cached for the life of the process.

Decisions also reads back the event log through it when it rebuilds a group (`group_log`,
`barrier_passed`): never cached, since the log grows.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson
from pydantic import BaseModel, ConfigDict


class ParticipantInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    participant: str
    session: str
    group: str
    id_in_group: int
    experiment: str


class GroupConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    session: str
    group: str
    experiment: str
    members: list[str]  # participant codes in id_in_group order
    num_periods: int
    period_length: float
    num_subperiods: int
    rate_limit: float
    params: dict[str, Any]
    # PROTOCOL v1.1 session settings (defaults: a session created before they existed).
    on_disconnect: Literal["continue", "pause", "end_period"] = "continue"
    carry_decisions: bool = True
    post_period_delay: float = 0.0

    def id_in_group(self, code: str) -> int:
        return self.members.index(code) + 1


class NotFound(LookupError):
    pass


class Directory:
    """HTTP client of the store's `/internal/*` look-ups, with a positive cache."""

    def __init__(self, store_url: str, token: str, *, timeout: float = 5.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=store_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._participants: dict[str, ParticipantInfo] = {}
        self._groups: dict[str, GroupConfig] = {}
        # One request per key in flight: a burst of connects for one code asks the store once.
        self._in_flight: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def close(self) -> None:
        await self._client.aclose()

    async def _get(self, path: str) -> dict[str, Any]:
        pending = self._in_flight.get(path)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._in_flight[path] = future
        try:
            body = await self._fetch(path)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure is not reported twice
            raise
        else:
            future.set_result(body)
            return body
        finally:
            del self._in_flight[path]

    async def _fetch(self, path: str) -> dict[str, Any]:
        response = await self._client.get(path)
        if response.status_code == 404:
            raise NotFound(path)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def participant(self, code: str) -> ParticipantInfo:
        cached = self._participants.get(code)
        if cached is not None:
            return cached
        info = ParticipantInfo.model_validate(
            await self._get(f"/internal/participants/{quote(code, safe='')}")
        )
        self._participants[code] = info
        return info

    async def group(self, group: str) -> GroupConfig:
        cached = self._groups.get(group)
        if cached is not None:
            return cached
        config = GroupConfig.model_validate(
            await self._get(f"/internal/groups/{quote(group, safe='')}")
        )
        self._groups[group] = config
        return config

    async def group_log(self, group: str) -> list[dict[str, Any]]:
        """The group's event log in its order (see `services.store.recovery`)."""
        response = await self._client.get(
            f"/internal/groups/{quote(group, safe='')}/log", timeout=60.0
        )
        response.raise_for_status()
        rows: list[dict[str, Any]] = orjson.loads(response.content)
        return rows

    async def barrier_passed(self, barrier: str) -> bool:
        response = await self._client.get(f"/internal/barriers/{quote(barrier, safe='')}")
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return True

    async def reachable(self) -> bool:
        try:
            response = await self._client.get("/healthz")
        except httpx.HTTPError:
            return False
        return response.status_code == 200
