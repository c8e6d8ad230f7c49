"""Look-ups of sessions' immutable facts, answered by the store over HTTP and cached.

The gateway asks "whose seat is key <key>?" when a WebSocket or a page opens; decisions asks
"how is group <id> configured?" before it handles the group's first message. Both answers never
change once a session exists, so they are cached for the life of the process (but for a group's
labels, given as people arrive: `group_fresh` reads past the cache). A key the store
does not know is remembered too (a bounded negative cache), so asking again costs nothing;
the gateway checks each key's tag before asking at all (services.common.seats).

Decisions also reads back the event log through it when it rebuilds a group (`group_log`,
`barrier_passed`): never cached, since the log grows.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx
import orjson
from pydantic import BaseModel, ConfigDict

from services.common.messages import is_lobby, lobby_group

if TYPE_CHECKING:
    from services.common.lobby import LobbyConfig


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
    on_disconnect: Literal["continue", "pause", "end_period", "bots"] = "continue"
    carry_decisions: bool = True
    # PROTOCOL v2 "Online studies": `on_disconnect: bots` lets a bot play a member away this
    # long; `bots`: seats a bot plays from the start (free seats the lobby filled).
    dropout_grace: float = 15.0
    bots: list[str] = []
    post_period_delay: float = 0.0
    # PROTOCOL v2 "Online studies": members' labels known when this was read (code → label),
    # and where each outcome sends a person (services.common.outcomes).
    labels: dict[str, str] = {}
    completion: dict[str, dict[str, Any]] = {}

    def id_in_group(self, code: str) -> int:
        return self.members.index(code) + 1


class NotFound(LookupError):
    pass


class NoFreeSeats(LookupError):
    """The lobby asked for bots in free seats, and the session has too few left."""


def _seat_info(body: dict[str, Any]) -> ParticipantInfo:
    """A seat as the store answers it; a seat with no group yet (arrival grouping) is in its
    session's lobby, addressed as `lobby_group(session)` with `id_in_group` 0."""
    if body.get("group") is None and isinstance(body.get("session"), str):
        body = {**body, "group": lobby_group(body["session"]), "id_in_group": 0}
    return ParticipantInfo.model_validate(body)


UNKNOWN_SEATS_REMEMBERED = 10_000


class Directory:
    """HTTP client of the store's `/internal/*` look-ups (with the internal token), cached."""

    def __init__(self, store_url: str, token: str, *, timeout: float = 5.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=store_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._seats: dict[str, ParticipantInfo] = {}  # seat key → its participant
        self._lobby_keys: dict[str, str] = {}  # code → seat key, of seats cached in a lobby
        self._lobby_settings: dict[str, LobbyConfig] = {}  # session → its lobby, for pages
        self._unknown_seats: OrderedDict[str, None] = OrderedDict()
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

    async def seat(self, key: str) -> ParticipantInfo:
        """The participant whose seat key is `key`; NotFound if the store knows none."""
        cached = self._seats.get(key)
        if cached is not None:
            return cached
        if key in self._unknown_seats:
            raise NotFound("unknown seat")
        try:
            body = await self._get(f"/internal/seats/{quote(key, safe='')}")
        except NotFound:
            self._unknown_seats[key] = None
            if len(self._unknown_seats) > UNKNOWN_SEATS_REMEMBERED:
                self._unknown_seats.popitem(last=False)
            raise NotFound("unknown seat") from None  # the path would hold the key
        info = _seat_info(body)
        self._keep_seat(key, info)
        return info

    def _keep_seat(self, key: str, info: ParticipantInfo) -> None:
        """Cache a seat. A seat in the lobby is cached too: the lobby sends a connection
        that is grouped already to its group (`group_formed`), and `regrouped` updates the
        entry when this gateway moves one, so the next socket of the seat goes there."""
        self._seats[key] = info
        if is_lobby(info.group):
            self._lobby_keys[info.participant] = key

    def regrouped(self, participant: str, group: str, id_in_group: int) -> None:
        """The lobby gave `participant` (a seat cached in the lobby) its group."""
        key = self._lobby_keys.pop(participant, None)
        info = self._seats.get(key) if key is not None else None
        if key is not None and info is not None:
            self._seats[key] = info.model_copy(update={"group": group, "id_in_group": id_in_group})

    async def group(self, group: str) -> GroupConfig:
        cached = self._groups.get(group)
        if cached is not None:
            return cached
        config = GroupConfig.model_validate(
            await self._get(f"/internal/groups/{quote(group, safe='')}")
        )
        self._groups[group] = config
        return config

    async def group_fresh(self, group: str) -> GroupConfig:
        """The group's configuration as the store has it now, past the cache: its `labels`
        grow as people arrive through the study link (decisions reads them as the last period
        ends). Replaces the cached entry, if there is one."""
        config = GroupConfig.model_validate(
            await self._get(f"/internal/groups/{quote(group, safe='')}")
        )
        if group in self._groups:
            self._groups[group] = config
        return config

    def forget_group(self, group: str) -> None:
        """Drop a group's cached configuration (decisions dropped the group; asked again if
        it comes back), so the cache holds no more groups than decisions does."""
        self._groups.pop(group, None)

    async def group_log(self, group: str) -> list[dict[str, Any]]:
        """The group's event log in its order (see `services.store.recovery`)."""
        response = await self._client.get(
            f"/internal/groups/{quote(group, safe='')}/log", timeout=60.0
        )
        response.raise_for_status()
        rows: list[dict[str, Any]] = orjson.loads(response.content)
        return rows

    async def lobby(self, session: str) -> LobbyConfig:
        """An arrival session's lobby as the store has it now (never cached: `formed` and
        `labels` change as people arrive)."""
        from services.common.lobby import LobbyConfig

        return LobbyConfig.model_validate(
            await self._get(f"/internal/lobbies/{quote(session, safe='')}")
        )

    async def lobby_settings(self, session: str) -> LobbyConfig:
        """An arrival session's lobby for what never changes in it (the settings a seat's
        page shows): cached, unlike `lobby`, whose `formed` and `labels` grow."""
        cached = self._lobby_settings.get(session)
        if cached is None:
            cached = self._lobby_settings[session] = await self.lobby(session)
        return cached

    async def lobby_log(self, session: str) -> list[dict[str, Any]]:
        """The lobby's event log (its rows have the group ""), in its order."""
        response = await self._client.get(
            f"/internal/lobbies/{quote(session, safe='')}/log", timeout=60.0
        )
        if response.status_code == 404:
            raise NotFound("unknown lobby")
        response.raise_for_status()
        rows: list[dict[str, Any]] = orjson.loads(response.content)
        return rows

    async def form_group(
        self, session: str, group: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]]:
        """Form `group` of an arrival session with `members` and `bots` free seats for bots,
        unless it was formed before: its members and which of them bots play (MongoDB's word:
        a group is formed once). NoFreeSeats: not enough free seats for the bots."""
        response = await self._client.post(
            f"/internal/lobbies/{quote(session, safe='')}/groups/{quote(group, safe='')}",
            content=orjson.dumps({"members": members, "bots": bots}),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code == 404:
            raise NotFound("unknown lobby or group")
        if response.status_code == 409:
            raise NoFreeSeats(group)
        response.raise_for_status()
        body: dict[str, Any] = orjson.loads(response.content)
        return [str(m) for m in body["members"]], [str(b) for b in body.get("bots") or []]

    async def join(self, join_key: str, query: dict[str, str], seat: str | None) -> dict[str, Any]:
        """A seat through a session's study link (PROTOCOL v2 "Online studies"): the store's
        answer, `{"key", "finished", "label"}` or `{"full": true, "redirect", "code"}`.

        Never cached: every arrival may take a seat. `query` is the link's whole query (the
        store knows which parameter is the label); `seat` the key from the browser's cookie.
        NotFound for a join key the store does not know. The seat given is cached for
        `seat` (the answer's `seat`, its participant)."""
        response = await self._client.post(
            f"/internal/join/{quote(join_key, safe='')}",
            content=orjson.dumps({"query": query, "seat": seat}),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code == 404:
            raise NotFound("unknown join key") from None  # the path would hold the key
        response.raise_for_status()
        body: dict[str, Any] = orjson.loads(response.content)
        self._remember_seat(body)
        return body

    def _remember_seat(self, answer: dict[str, Any]) -> None:
        """The seat a join answer gives, cached as `seat` would cache it: the person's
        socket opens next, usually on this gateway, and a seat's facts never change."""
        key, info = answer.get("key"), answer.get("seat")
        if not isinstance(key, str) or not isinstance(info, dict) or key in self._seats:
            return
        try:
            seat = _seat_info(info)
        except ValueError:
            return  # a store that answers otherwise: the socket asks `/internal/seats`
        self._keep_seat(key, seat)
        self._unknown_seats.pop(key, None)

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
