"""The researcher console's live monitor: each watched session's groups, folded from the log
stream as it flows and pushed to consoles over Server-Sent Events.

Owns `LiveHub` (the live views and the stream that feeds them), the monitor tickets and the
SSE route `GET /api/sessions/{session}/live?ticket=…` (docs/console.md).

Where the events come from: while at least one console watches a session, this store process
has a queue of its own (exclusive, auto-delete, classic) bound to the `canopy.log` direct
exchange with the store queue's routing key (`log`). A direct exchange copies a message to
every queue bound with its key, so every replica of the store sees the whole log, whichever
replica writes it to MongoDB; MongoDB is read once per watched session, at subscribe time,
never polled. When the last console leaves, the consumer is cancelled and the queue goes with
it: a store nobody watches costs the broker nothing.

Snapshot, then deltas, with no gap: the queue is bound first (records from then on are held
for the session), then a log barrier is sent and awaited (as a decisions worker does at
start-up: once the store wrote it, everything published to the log before the queue was bound
is in MongoDB too), then each group's log is folded from MongoDB through the groups' own state
machine (`services.common.group.GroupState.fold`, the same one decisions and the replay run:
one implementation of each rule), and the held records are folded on top, those the snapshot
already had skipped by their ids. After a broker reconnection (records may have been missed
meanwhile) every view is rebuilt the same way.

Seats (PROTOCOL v2 "Online studies"): the view lists each participant with its `label`,
`status` and `outcome`, as the session detail does. A logged `presence` or `finished` row
changes them in the view at once (a `participants` event); a label the study link gave (the
store's join, not the log) is read from MongoDB when its seat is first seen connected.

The lobby (PROTOCOL v2, `grouping: "arrival"`): its rows (group "") set a seat's `lobby_since`
and `connected` (`lobby_join`, `lobby_leave`, as the store's writer does); `group_formed` gives the
members their group, and the group's view its members: the group's state is built again with
them, over the group's rows that came before the view knew its members.

Time left is never sent as a number that goes stale: a view carries the period's `ends_at`
(the server timestamp of its period_start plus its length) and every event carries the
server's `now`, so the console counts down on the server's clock; a running period past its
end is `overdue` (the console shows it as ending) until its `period_end` arrives.

Auth: `EventSource` cannot send an `Authorization` header, and the admin token must not be in
a URL. The console trades its token (`POST /api/monitor/tickets {"session"}`, bearer) for a
ticket: one session's, valid 30 s, good for opening one stream. It is the expiry and a random
nonce, signed with HMAC-SHA256 keyed by the admin token over the session, expiry and nonce, so
any replica checks it; the nonce of a ticket that opened a stream is kept in MongoDB until the
ticket expires (`UsedTickets`), so no replica lets it open a second one. An open stream stays
open: it ends with the store process, which is also how a new admin token takes effect (the
console then fetches a new ticket with its token, or is asked to sign in again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import orjson
from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import AMQPError
from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.common.barrier import wait_for_barrier
from services.common.bus import LOG, LOG_KEY, Bus, declare_monitor_queue
from services.common.errors import ApiCode, ApiError
from services.common.experiments import Registry
from services.common.group import GroupState
from services.common.lobby import GROUP_FORMED, LOBBY_JOIN, LOBBY_LEAVE
from services.store.api import _documented as documented
from services.store.api import bearer_auth, seat_status, token_first_route, token_matches
from services.store.domain import group_config, iso_ts
from services.store.repository import Repository

log = logging.getLogger(__name__)

TICKET_SECONDS = 30
USED_TICKETS = "monitor_tickets"  # the collection of used tickets' nonces (UsedTickets)
# Waiting for the barrier: the store writes a batch every CANOPY_STORE_BATCH_SECONDS (0.1 s).
BARRIER_POLL = 0.02
BARRIER_TIMEOUT = 5.0
# Log batches held for this process beyond this are dropped oldest first (the live view only:
# the store's own queue keeps everything). "drop-head", not "reject-publish": a full monitor
# queue must never nack decisions' publishes.
QUEUE_MAX_LENGTH = 20_000
# Deltas of one session are coalesced over this long (a busy group changes every millisecond).
FLUSH_INTERVAL = 0.05
STATS_INTERVAL = 1.0
RATE_WINDOW = 5  # seconds over which events per second are averaged
# A console that falls this many events behind gets one fresh snapshot instead.
WATCHER_BACKLOG = 200
RETRY_MS = 2000  # EventSource's wait before it reconnects to a stream that ended
# Rows of the snapshot this recent are remembered by id, to skip them among the held records.
DEDUPE_SECONDS = 120.0


# -- tickets -------------------------------------------------------------------------------


def _signature(token: str, session: str, expires: int, nonce: str) -> str:
    message = f"canopy.monitor:{expires}:{nonce}:{session}".encode(errors="replace")
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def issue_ticket(token: str, session: str, now: float | None = None) -> tuple[str, int]:
    """A monitor ticket for `session`'s stream and its expiry (epoch seconds)."""
    expires = int((time.time() if now is None else now) + TICKET_SECONDS)
    nonce = secrets.token_urlsafe(12)  # 16 characters of [A-Za-z0-9_-]: never a "."
    return f"{expires}.{nonce}.{_signature(token, session, expires, nonce)}", expires


def ticket_parts(
    token: str, ticket: str, session: str, now: float | None = None
) -> tuple[str, int] | None:
    """(nonce, expiry) of a ticket signed for `session` and not expired; None otherwise."""
    expires_text, nonce, signature = ([*ticket.split(".", 2), "", ""])[:3]
    if not (expires_text.isascii() and expires_text.isdigit()) or len(expires_text) > 12:
        return None
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return None
    expected = _signature(token, session, expires, nonce)
    if not (nonce and hmac.compare_digest(signature.encode(), expected.encode())):
        return None
    return nonce, expires


def ticket_valid(token: str, ticket: str, session: str, now: float | None = None) -> bool:
    """Whether `ticket` is one this store signed for `session`, not expired (used or not:
    `UsedTickets` says that)."""
    return ticket_parts(token, ticket, session, now) is not None


class UsedTickets:
    """Nonces of the tickets that opened a stream, each kept until its ticket expires, in
    MongoDB: every store replica sees them, so a ticket opens one stream in all."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self._collection = collection

    async def take(self, nonce: str, expires: int) -> bool:
        """Mark the ticket used; False if it was already."""
        try:
            await self._collection.insert_one({"_id": nonce, "expires": expires})
        except DuplicateKeyError:
            return False
        # Forget expired ones (an expired ticket is refused before it gets here). A handful a
        # minute at most: a scan costs nothing.
        await self._collection.delete_many({"expires": {"$lt": int(time.time()) - 1}})
        return True


# -- views ---------------------------------------------------------------------------------


def group_view(state: GroupState, now: float) -> dict[str, Any]:
    """What the console shows of one group, from its state machine's state."""
    config = state.config
    public = state.public_state()
    payoffs: dict[str, float] = {}
    for period in state.history:
        for code, payoff in period["payoffs"].items():
            payoffs[code] = payoffs.get(code, 0.0) + payoff
    view: dict[str, Any] = {
        "group": config.group,
        "members": list(config.members),
        "connected": [code for code in config.members if code in state.connections],
        "period": {
            "number": state.period,
            "of": config.num_periods,
            "state": public,
            "ends_at": state.ends_at,
            "length": config.period_length,
            "remaining": state.remaining,
            "subperiod": state.subperiod,
            "num_subperiods": config.num_subperiods,
            "overdue": public == "running" and state.ends_at is not None and state.ends_at <= now,
        },
        "decisions": dict(state.decisions),
        "periods_ended": len(state.history),
        "total_payoffs": payoffs,
    }
    if state.experiment.own_channels:  # an experiment's own state (the auction's book)
        view["market"] = state.hello_extra()  # a failing hook: empty, never a 500
    return view


class LiveSession:
    """One watched session: its groups' states, its consoles, its recent event counts."""

    def __init__(self, session_id: str, experiments: Registry | None = None) -> None:
        self.id = session_id
        # The experiments its groups are of: the store's (the built-ins alone when not given).
        self.experiments = Registry.builtin() if experiments is None else experiments
        self.watchers: set[asyncio.Queue[ServerSentEvent]] = set()
        self.groups: dict[str, GroupState] = {}
        # Arrival grouping: the rows of a group whose members the view does not know yet.
        self.unformed: dict[str, list[dict[str, Any]]] = {}
        self.participants: list[dict[str, Any]] = []
        self.changed_seats = False  # a participants event is due
        self.unread_labels = False  # a seat first seen: its label may be new in MongoDB
        self.document: dict[str, Any] = {}
        self.ready = False
        self.held: list[dict[str, Any]] = []  # records that arrived before the snapshot
        self.seen: set[str] = set()
        self.dirty: set[str] = set()
        self.counts: deque[list[int]] = deque()  # [second, records], oldest first
        self.loading: asyncio.Task[None] | None = None

    def count(self, records: int, now: float) -> None:
        second = int(now)
        if self.counts and self.counts[-1][0] == second:
            self.counts[-1][1] += records
        else:
            self.counts.append([second, records])
        while self.counts and self.counts[0][0] <= second - RATE_WINDOW:
            self.counts.popleft()

    def events_per_second(self, now: float) -> float:
        second = int(now)
        recent = sum(n for s, n in self.counts if s > second - RATE_WINDOW)
        return round(recent / RATE_WINDOW, 2)

    def fold(self, record: dict[str, Any]) -> bool:
        """Apply one log record to its group; whether it changed anything we show."""
        self.fold_seat(record)
        if record.get("group") == "" and record.get("channel") == GROUP_FORMED:
            return self.form(record.get("value"))
        state = self.groups.get(str(record.get("group")))
        if state is None:
            return False
        if not state.config.members:
            self.unformed.setdefault(state.config.group, []).append(record)
        try:
            state.fold(record)
        except Exception:  # a record the state machine cannot take must not stop the view
            log.exception("live view of session %s: record %s not folded", self.id, record["id"])
            return False
        self.dirty.add(state.config.group)
        return True

    def form(self, value: Any) -> bool:
        """The lobby formed a group (`group_formed {"group", "members"}`): its view, with them."""
        if not isinstance(value, dict) or not isinstance(value.get("members"), list):
            return False
        state = self.groups.get(str(value.get("group")))
        if state is None or state.config.members:
            return False  # not this session's, or known already (the snapshot read it)
        config = state.config.model_copy(update={"members": [str(m) for m in value["members"]]})
        formed = GroupState(config, self.experiments.get(config.experiment))
        for record in self.unformed.pop(config.group, []):
            try:
                formed.fold(record)
            except Exception:  # as in fold: one record must not stop the view
                log.exception("live view of session %s: record not folded", self.id)
        self.groups[config.group] = formed
        self.dirty.add(config.group)
        return True

    def fold_seat(self, record: dict[str, Any]) -> None:
        """A seat's status and outcome from a logged `presence` or `finished` row (the same
        fields the store's writer sets on the participant document), and its place in the
        lobby from the lobby's rows."""
        value = record.get("value")
        if record.get("direction") != "out" or not isinstance(value, dict):
            return
        channel, lobby = record.get("channel"), record.get("group") == ""
        changes: list[tuple[Any, dict[str, Any]]]
        bot = bool(value.get("bot"))  # a bot's presence: no person is connected
        if channel == "presence" and value.get("connected") is True:
            # A bot's: the seat is marked (`bot`, as the session detail has it), not connected.
            fields: dict[str, Any] = (
                {"seen": True, "bot": True} if bot else {"seen": True, "connected": True}
            )
            changes = [(value.get("participant"), fields)]
        elif channel == "presence" and value.get("connected") is False and not bot:
            changes = [(value.get("participant"), {"connected": False})]
        elif channel == "finished" and record.get("participant"):
            changes = [(record["participant"], {"outcome": value.get("outcome")})]
        elif lobby and channel == LOBBY_JOIN and isinstance(value.get("arrived"), int | float):
            since = iso_ts(float(value["arrived"]))  # the first arrival, every time
            changes = [
                (value.get("participant"), {"seen": True, "connected": True, "lobby_since": since})
            ]
        elif lobby and channel == LOBBY_LEAVE:
            changes = [(value.get("participant"), {"connected": False})]
        elif lobby and channel == GROUP_FORMED and isinstance(value.get("members"), list):
            group = value.get("group")
            changes = [
                (code, {"group": group, "id_in_group": i + 1})
                for i, code in enumerate(value["members"])
            ]
        else:
            return
        for code, fields in changes:
            self._change_seat(code, fields)

    def _change_seat(self, code: Any, fields: dict[str, Any]) -> None:
        for seat in self.participants:
            if seat["code"] == code:
                if seat["label"] is None and seat["status"] == "unassigned":
                    self.unread_labels = True
                before = dict(seat)
                seat.update(fields)
                seat["status"], seat["outcome"] = seat_status(seat), seat.get("outcome")
                if seat != before:
                    self.changed_seats = True
                return

    def participants_view(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in p.items() if k != "seen"} for p in self.participants]

    def snapshot(self, now: float) -> ServerSentEvent:
        document = self.document
        data = {
            "session": self.id,
            "now": now,
            "experiment": document.get("experiment"),
            "label": document.get("label", ""),
            "num_participants": document.get("num_participants"),
            # PROTOCOL v2 "The lobby": an arrival session's monitor shows who waits.
            "grouping": document.get("grouping", "fixed"),
            "group_size": document.get("group_size"),
            "lobby_timeout": document.get("lobby_timeout"),
            "groups": [group_view(state, now) for state in self.groups.values()],
            "participants": self.participants_view(),
            "events_per_second": self.events_per_second(now),
        }
        return _event("snapshot", data)


def _event(name: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(event=name, raw_data=orjson.dumps(data).decode())


def _push(live: LiveSession, event: ServerSentEvent) -> None:
    for queue in list(live.watchers):
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:  # a console that stopped reading: one snapshot catches it up
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(live.snapshot(time.time()))


class LiveHub:
    """The live views of the sessions consoles watch, and the log stream that feeds them."""

    def __init__(
        self,
        bus: Bus,
        repository: Repository,
        *,
        instance: str,
        experiments: Registry | None = None,
    ) -> None:
        """`experiments`: the store's registry (the built-ins alone when not given)."""
        self._bus = bus
        self._experiments = Registry.builtin() if experiments is None else experiments
        self._repository = repository
        self._instance = instance
        self._sessions: dict[str, LiveSession] = {}
        self._lock = asyncio.Lock()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reconnect_hooked = False
        self.batches_seen = 0

    @property
    def consuming(self) -> bool:
        return self._queue is not None

    @property
    def watched(self) -> list[str]:
        return sorted(self._sessions)

    @asynccontextmanager
    async def watch(self, session_id: str) -> AsyncIterator[asyncio.Queue[ServerSentEvent]]:
        """Events for one console of one session: a snapshot, then deltas and stats."""
        queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue(maxsize=WATCHER_BACKLOG)
        async with self._lock:
            await self._start()
            live = self._sessions.get(session_id)
            if live is None:
                live = self._sessions[session_id] = LiveSession(session_id, self._experiments)
                live.loading = asyncio.create_task(self._load(live))
            live.watchers.add(queue)
            if live.ready:
                queue.put_nowait(live.snapshot(time.time()))
        try:
            yield queue
        finally:
            live.watchers.discard(queue)
            if not live.watchers and self._sessions.get(session_id) is live:
                del self._sessions[session_id]
                if live.loading is not None:
                    live.loading.cancel()
            if not self._sessions:
                # Not awaited here: this runs while the stream's task is being cancelled.
                task = asyncio.get_running_loop().create_task(self._stop_if_idle())
                _BACKGROUND.add(task)
                task.add_done_callback(_BACKGROUND.discard)

    # -- the stream ------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._queue is not None:
            return
        connection = self._bus.connection
        if not self._reconnect_hooked:
            connection.reconnect_callbacks.add(self._on_reconnect)
            self._reconnect_hooked = True
        channel = await connection.channel()
        queue = await declare_monitor_queue(channel, self._instance, max_length=QUEUE_MAX_LENGTH)
        # no_ack: a live view; what it misses in a reconnection is rebuilt from MongoDB.
        self._consumer_tag = await queue.consume(self._on_message, no_ack=True)
        self._channel, self._queue = channel, queue
        self._ticker = asyncio.create_task(self._tick())
        log.info("live monitor: consuming the log on %s", queue.name)

    async def _stop_if_idle(self) -> None:
        async with self._lock:
            if self._sessions or self._queue is None:
                return
            queue, channel, ticker = self._queue, self._channel, self._ticker
            self._queue = self._channel = self._ticker = None
            if ticker is not None:
                ticker.cancel()
            with contextlib.suppress(Exception):  # the channel may be gone with the broker
                if self._consumer_tag is not None:
                    await queue.cancel(self._consumer_tag)
                if channel is not None:
                    await channel.close()
            log.info("live monitor: nobody watches; stopped consuming the log")

    async def close(self) -> None:
        self._sessions.clear()
        await self._stop_if_idle()

    async def _on_message(self, message: Any) -> None:
        self.batches_seen += 1
        if not self._sessions:
            return
        try:
            batch = orjson.loads(message.body)
            records = batch["records"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return  # the store's writer dead-letters malformed batches; nothing to show
        now = time.time()
        touched = set()
        for record in records:
            live = (
                self._sessions.get(str(record.get("session"))) if isinstance(record, dict) else None
            )
            if live is None:
                continue
            live.count(1, now)
            if not live.ready:
                live.held.append(record)
            elif record.get("id") not in live.seen and live.fold(record):
                touched.add(live.id)
        if touched:
            self._wake.set()

    def _on_reconnect(self, *_: Any) -> None:
        """Records may have passed while the connection was down: rebuild every view."""
        for live in self._sessions.values():
            live.ready, live.held = False, []
            if live.loading is not None:
                live.loading.cancel()
            live.loading = asyncio.get_running_loop().create_task(self._load(live))

    async def _tick(self) -> None:
        """Coalesced deltas (every FLUSH_INTERVAL at most) and stats every STATS_INTERVAL."""
        last_stats = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=STATS_INTERVAL)
            self._wake.clear()
            now = time.time()
            for live in list(self._sessions.values()):
                if live.ready and live.dirty:
                    groups = [group_view(live.groups[g], now) for g in sorted(live.dirty)]
                    live.dirty.clear()
                    _push(live, _event("groups", {"now": now, "groups": groups}))
                if live.ready and live.unread_labels:
                    live.unread_labels = False
                    await self._read_labels(live)
                if live.ready and live.changed_seats:
                    live.changed_seats = False
                    seats = {"now": now, "participants": live.participants_view()}
                    _push(live, _event("participants", seats))
            if now - last_stats >= STATS_INTERVAL:
                last_stats = now
                for live in list(self._sessions.values()):
                    if live.ready:
                        stats = {"now": now, "events_per_second": live.events_per_second(now)}
                        _push(live, _event("stats", stats))
            await asyncio.sleep(FLUSH_INTERVAL)  # pacing: let a burst's changes pile up

    # -- snapshots -------------------------------------------------------------------------

    async def _load(self, live: LiveSession) -> None:
        try:
            await self._wait_for_log()
            document = await self._repository.session(live.id)
            if document is None:
                _push(live, _event("gone", {"session": live.id}))
                return
            groups = {g["_id"]: g for g in await self._repository.session_groups(live.id)}
            states: dict[str, GroupState] = {}
            seen: set[str] = set()
            recent = time.time() - DEDUPE_SECONDS
            for group_id in document["groups"]:
                config = group_config(document, groups[group_id])
                state = GroupState(config, live.experiments.get(config.experiment))
                async for row in self._repository.group_events(group_id):
                    state.fold({**row, "value": orjson.loads(row["value"])})
                    if row["ts"] >= recent:
                        seen.add(row["_id"])
                states[group_id] = state
            live.document, live.groups, live.seen = document, states, seen
            live.participants = [
                seat_view(p) for p in await self._repository.session_participants(live.id)
            ]
            held, live.held = live.held, []
            for record in held:
                if record.get("id") not in seen:
                    live.fold(record)
            live.dirty.clear()
            live.ready = True
            _push(live, live.snapshot(time.time()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("live view of session %s could not be built", live.id)
            message = "the store could not build the view (see its log)"
            _push(live, _event("failed", {"session": live.id, "message": message}))

    async def _read_labels(self, live: LiveSession) -> None:
        """Labels the study link gave since the view was built (not in the log)."""
        try:
            documents = await self._repository.session_participants(live.id)
        except Exception as exc:  # MongoDB away: the labels come with the next snapshot
            log.warning("live view of session %s: labels not read (%r)", live.id, exc)
            return
        labels = {p["_id"]: p.get("label") for p in documents}
        taken = {p["_id"] for p in documents if p.get("taken")}
        for seat in live.participants:
            label = labels.get(seat["code"], seat["label"])
            status = seat_status({**seat, "taken": seat["code"] in taken})
            if (label, status) != (seat["label"], seat["status"]):
                seat["label"], seat["status"] = label, status
                live.changed_seats = True

    async def _wait_for_log(self) -> None:
        """Until everything published to the event log before now is in MongoDB (a barrier);
        at most BARRIER_TIMEOUT, after which the snapshot is read without it."""
        passed = await wait_for_barrier(
            partial(self._bus.publish, LOG, LOG_KEY),
            self._repository.barrier_passed,
            poll=BARRIER_POLL,
            resend_after=None,
            give_up_after=BARRIER_TIMEOUT,
        )
        if not passed:
            log.warning("log barrier not written in %.0f s; snapshot without it", BARRIER_TIMEOUT)


_BACKGROUND: set[asyncio.Task[None]] = set()


def seat_view(document: dict[str, Any]) -> dict[str, Any]:
    """A participant as the live view lists it (`seen` is kept for the status, not sent)."""
    return {
        "code": document["_id"],
        "group": document["group"],
        "id_in_group": document["id_in_group"],
        "url": document["url"],
        "label": document.get("label"),
        "status": seat_status(document),
        "outcome": document.get("outcome"),
        "connected": bool(document.get("connected")),
        # Arrival grouping: when the person first came to the lobby (as the session detail).
        "lobby_since": iso_ts(document["lobby_since"]) if document.get("lobby_since") else None,
        "seen": bool(document.get("seen") or document.get("taken")),
        # A bot plays or played the seat (as the session detail's `bot`).
        "bot": bool(document.get("bot") or document.get("bot_played")),
    }


class TicketRequest(BaseModel):
    """Body of `POST /api/monitor/tickets`: whose stream the ticket opens."""

    model_config = ConfigDict(extra="forbid")

    session: str = Field(min_length=1, max_length=200)


def tickets_router(token: str) -> APIRouter:
    """`POST /api/monitor/tickets` (bearer, in the OpenAPI schema): a ticket for one stream."""
    router = APIRouter(
        prefix="/api",
        dependencies=[bearer_auth(token)],
        route_class=token_first_route(token),
        responses=documented(401),
    )

    @router.post("/monitor/tickets", status_code=201)
    async def monitor_ticket(request: TicketRequest) -> dict[str, Any]:
        """A ticket for `GET /api/sessions/{session}/live?ticket=…` (the live monitor's SSE
        stream, which a browser opens without headers): that session's only, valid 30 s,
        opens one stream."""
        ticket, expires = issue_ticket(token, request.session)
        return {"ticket": ticket, "expires_at": expires}

    return router


def live_router(hub: LiveHub, repository: Repository, token: str) -> APIRouter:
    """`GET /api/sessions/{session}/live?ticket=…`: the session's live view as SSE.

    Not in the OpenAPI schema (a stream that never ends; its auth is a ticket, not the
    bearer token); documented in docs/console.md."""
    router = APIRouter(prefix="/api", include_in_schema=False)
    used = UsedTickets(repository.quarantine.database[USED_TICKETS])

    async def ticket_checked(
        request: Request, session_id: str, ticket: Annotated[str | None, Query()] = None
    ) -> None:
        # A script may send the bearer token instead (curl -N); a browser sends a ticket.
        parts = ticket_parts(token, ticket, session_id) if ticket is not None else None
        if parts is not None and await used.take(*parts):
            return
        if ticket is None and token_matches(request.headers.get("authorization"), token):
            return
        raise ApiError(
            401,
            ApiCode.UNAUTHORIZED,
            "missing, wrong, used or expired ticket (POST /api/monitor/tickets gives one), "
            "or 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def existing(session_id: str) -> None:
        if await repository.session(session_id) is None:
            raise ApiError(404, ApiCode.NOT_FOUND, f"no session {session_id[:100]!r}")

    @router.get(
        "/sessions/{session_id}/live",
        response_class=EventSourceResponse,
        # In this order: a stranger learns nothing, not even whether a session exists.
        dependencies=[Depends(ticket_checked), Depends(existing)],
    )
    async def live(session_id: str) -> AsyncIterable[ServerSentEvent]:
        try:
            async with hub.watch(session_id) as events:
                yield ServerSentEvent(comment="watching", retry=RETRY_MS)
                while True:
                    yield await events.get()
        except (AMQPError, ConnectionError, RuntimeError) as exc:
            # The broker is away (the hub could not bind its queue): say so and end the
            # stream; EventSource comes back after RETRY_MS by itself.
            log.warning("live monitor of session %s unavailable: %r", session_id, exc)
            yield _event("failed", {"session": session_id, "message": "the broker is away"})

    return router
