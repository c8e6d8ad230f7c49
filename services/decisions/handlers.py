"""Bus handlers of the decisions service: feed each group's inputs to its `GroupState`.

One consumer per shard queue handles messages one at a time, so a group's inputs are applied in
the one order the broker holds them in. Effects are published (with confirms) before the input
is acknowledged, so a crash between the two replays the input instead of losing its output.

Broadcasts go straight to the queues of the gateways that hold the group's members: every frame
and presence input names its connection and gateway (`Routes`), and one `Batcher` per gateway
sends what the inputs of one moment produced for it as one message.

Crash safety (ARCHITECTURE "Crash-safe state"): a worker that starts first waits for its log
barrier (`wait_for_log`): once the store wrote it, every record that a previous worker sent is
in MongoDB. It then rebuilds each group from the group's log before handling the group's first
input (`group.rebuild`), so a redelivered input is recognised as applied (`seen`) and applied
exactly once. It asks every gateway to announce its open connections again (`Resync`): members
get a fresh `hello` and broadcasts reach them; a member nobody announces within
`resync_window` is disconnected. Gateways send a heartbeat each second; the members of a
gateway silent for `liveness_timeout` are disconnected (their presence turns false).

Bounded memory: a group whose last period ended and whose members all left is evicted
(`_evict_ended`, `evict_after` seconds later, in one sweep for every such group) once the log
in MongoDB holds all its rows: the log batches that could carry them were confirmed, then a log
barrier passed. A later input for it (a late presence, a reconnect, a redelivery) rebuilds it
from the log, as after a restart, so a participant back after the end gets the final `hello`.
A member still connected keeps the group in memory: a state rebuilt from the log could not tell
an open socket from a gone one without asking the gateways again.

The end for everyone (PROTOCOL v2 "Online studies"): the input that ends a group's last period
also decides each member's outcome and sends their `finished` (`GroupState._finish`), whose
redirect holds the member's label. Labels are given as people arrive through the study link,
after the group's configuration was cached, so before applying an input that may end the last
period (a `period_end` tick, a disconnection under `on_disconnect: end_period`, a gateway's
death, a member not announced again), the worker reads the group's configuration afresh
(`Directory.group_fresh`) and hands its labels to the state. Read before the input, not after:
its effects are then carried out in the same step as the input, so nothing else of the group
comes between `period_end` and the `finished` rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Literal, TypeVar

import httpx
from aio_pika.abc import AbstractIncomingMessage

from services.common import experiments, messages
from services.common.barrier import wait_for_barrier
from services.common.bus import (
    COMMANDS,
    DEFAULT,
    GATEWAYS,
    LOG,
    LOG_KEY,
    TIMERS_KEY,
    Batcher,
    completed,
    shard_of,
)
from services.common.directory import GroupConfig, NoFreeSeats, NotFound
from services.common.group import (
    UNKNOWN,
    BotAfter,
    Broadcast,
    Control,
    Effect,
    FlushAt,
    GroupState,
    PausePeriod,
    ResumePeriod,
    StartPeriod,
    TimersCommand,
    rebuild,
)
from services.common.lobby import LobbyEffect, LobbyState, Record, WakeAt
from services.common.lobby import rebuild as rebuild_lobby
from services.common.logs import context
from services.common.messages import (
    Channel,
    Envelope,
    LogRecord,
    MessageType,
    PresenceChanged,
    Resync,
    TimerFired,
    WokeUp,
    inbound_record,
    is_lobby,
    lobby_group,
    new_id,
    now,
    outbound_record,
)
from services.common.ports import GroupDirectory, Publisher
from services.decisions.botplay import BotPlayer
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

RETIRED_CONNECTIONS = 10_000
# Reads of a group's labels before its last period ends: tries, and the first retry's delay
# (doubling). A store away longer does not hold the group's end: the labels known so far go.
LABEL_READS = 5
LABEL_RETRY_DELAY = 0.1


class Routes:
    """Which gateway holds which member's connection, learnt from the inputs themselves.

    A `PresenceChanged` (connected) names the member's newest connection; a frame fills in a
    member not known yet (e.g. after this worker restarted). A replaced connection's gateway is
    remembered a while longer, for the `replaced` notice that closes it.
    """

    def __init__(self) -> None:
        self._members: dict[str, dict[str, tuple[str, str]]] = {}  # group → code → (conn, gw)
        self._retired: OrderedDict[str, str] = OrderedDict()  # connection → gateway

    def learn(self, envelope: Envelope) -> None:
        participant, connection, gateway = (
            envelope.participant,
            envelope.connection,
            envelope.gateway,
        )
        if participant is None or connection is None or gateway is None:
            return
        members = self._members.setdefault(envelope.group, {})
        current = members.get(participant)
        if envelope.type is MessageType.PRESENCE_CHANGED:
            if PresenceChanged.of(envelope).connected:
                if current is not None and current[0] != connection:
                    self._retire(*current)
                members[participant] = (connection, gateway)
            elif current is not None and current[0] == connection:
                del members[participant]
            else:  # a replaced connection closed
                self._retired.pop(connection, None)
        elif current is None:
            members[participant] = (connection, gateway)

    def drop_gateway(self, gateway: str) -> list[tuple[str, str, str]]:
        """Forget every member held by `gateway`; their (group, participant, connection)."""
        gone = []
        for group, members in self._members.items():
            for participant, (connection, held_by) in list(members.items()):
                if held_by == gateway:
                    del members[participant]
                    gone.append((group, participant, connection))
        return gone

    def forget(self, group: str) -> None:
        self._members.pop(group, None)

    def gateways(self) -> set[str]:
        return {gw for members in self._members.values() for _, gw in members.values()}

    def group(self, group: str) -> set[str]:
        return {gateway for _, gateway in self._members.get(group, {}).values()}

    def member(self, group: str, participant: str, connection: str | None = None) -> str | None:
        current = self._members.get(group, {}).get(participant)
        if current is not None and (connection is None or current[0] == connection):
            return current[1]
        return self._retired.get(connection) if connection is not None else None

    def _retire(self, connection: str, gateway: str) -> None:
        self._retired[connection] = gateway
        if len(self._retired) > RETIRED_CONNECTIONS:
            self._retired.popitem(last=False)


# The payload of a command to the timers (a union, not their base class: pydantic serializes a
# field by its declared type, and `Payload` has no fields).
TimersPayload = messages.StartPeriod | messages.PausePeriod | messages.ResumePeriod


def _timers_command(effect: TimersCommand) -> tuple[MessageType, TimersPayload]:
    """The timers command (messages.py) a state machine's effect asks for."""
    if isinstance(effect, StartPeriod):
        return MessageType.START_PERIOD, messages.StartPeriod(
            period=effect.period,
            period_length=effect.period_length,
            num_subperiods=effect.num_subperiods,
            delay=effect.delay,
        )
    if isinstance(effect, PausePeriod):
        return MessageType.PAUSE_PERIOD, messages.PausePeriod(period=effect.period)
    return MessageType.RESUME_PERIOD, messages.ResumePeriod(
        period=effect.period, ends_at=effect.ends_at, next_tick=effect.next_tick
    )


def _finishing(envelope: Envelope) -> Literal["period_end", "disconnect"] | None:
    """What kind of input that may end a group's last period `envelope` is (None: not one)."""
    if envelope.type is MessageType.TIMER_FIRED:
        return "period_end" if TimerFired.of(envelope).event == "period_end" else None
    if envelope.type is MessageType.PRESENCE_CHANGED:
        return None if PresenceChanged.of(envelope).connected else "disconnect"
    return None


def _out_record(envelope: Envelope) -> LogRecord:
    """The log row of a frame out; a lobby's rows have the group "" (PROTOCOL v2)."""
    record = outbound_record(envelope)
    return record.model_copy(update={"group": ""}) if is_lobby(record.group) else record


def _stamp(state: GroupState | LobbyState, broadcast: Broadcast) -> float:
    """A broadcast's row `ts`: the state machine's (ticks), or the group's next one."""
    return broadcast.ts if broadcast.ts is not None else state.stamp(now())


class DecisionsWorker:
    def __init__(
        self,
        bus: Publisher,
        directory: GroupDirectory,
        metrics: DecisionsMetrics,
        log_writer: LogWriter,
        *,
        resync_window: float = 5.0,
        liveness_timeout: float = 3.0,
        evict_after: float = 5.0,
    ) -> None:
        self._bus = bus
        self._directory = directory
        self._metrics = metrics
        self._log = log_writer
        self._resync_window = resync_window
        self._liveness_timeout = liveness_timeout
        self.groups: dict[str, GroupState] = {}
        # Arrival sessions' lobbies by their bus address (services.common.lobby).
        self.lobbies: dict[str, LobbyState] = {}
        # Seats bots play (on_disconnect / on_lobby_timeout bots), and the grace timers
        # before a bot takes over a member who left (group → member → handle).
        self.bots = BotPlayer(self._apply_bot, self._held)
        self._grace: dict[str, dict[str, asyncio.TimerHandle]] = {}
        self.routes = Routes()
        self._outputs: dict[str, Batcher] = {}  # gateway queue → its batcher
        self._flush_handles: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heard: dict[str, float] = {}  # gateway queue → loop time of its last heartbeat
        self._started = 0.0
        # group → receipt time of the oldest decision a pending rate-limited flush carries.
        self._pending_origin: dict[str, float] = {}
        self._evict_after = evict_after
        self._sweep: asyncio.TimerHandle | asyncio.Task[None] | None = None  # the next eviction
        self._unlogged: set[asyncio.Future[None]] = set()  # log batches not confirmed yet
        # Groups whose state was dropped because an input's outputs failed: their next
        # rebuild first waits until the log holds every batch sent before (see `_confirmed`).
        self._tainted: set[str] = set()
        # Groups whose `_apply_now` stamped rows not handed to the log yet.
        self._applying: dict[str, int] = {}

    # -- start-up ----------------------------------------------------------------------------

    async def wait_for_log(self, *, poll: float = 0.02, resend_after: float = 10.0) -> float:
        """Wait until the store wrote everything sent to the log before now; seconds waited.

        A barrier goes through the log queue behind whatever a previous worker left there;
        the store records it after the batch holding it was written."""
        started = time.perf_counter()
        await self._log_barrier(poll=poll, resend_after=resend_after)
        # Resync window and heartbeat silence count from here.
        self._started = asyncio.get_running_loop().time()
        return time.perf_counter() - started

    async def _log_barrier(self, *, poll: float = 0.02, resend_after: float = 10.0) -> None:
        """Until the store wrote everything published to the event log before now."""
        await wait_for_barrier(
            partial(self._bus.publish_reliably, LOG, LOG_KEY),
            self._directory.barrier_passed,
            poll=poll,
            resend_after=resend_after,
            tolerate=(httpx.HTTPError,),
        )

    async def request_resync(self, shards: list[int] | None = None) -> None:
        """Ask every gateway to announce its open connections again (after taking shards
        over): those of the groups in `shards`, or all."""
        envelope = Envelope[Resync](
            type=MessageType.RESYNC, session="", group="", payload=Resync(shards=shards)
        )
        await self._bus.publish_reliably(GATEWAYS, "", envelope, mandatory=False)

    def forget_shard(self, index: int, shards: int) -> int:
        """Drop the state of the groups of a shard handed to another worker; how many.

        Called once the shard's consumer stopped and everything it handled is acknowledged;
        if the shard comes back, its groups are rebuilt from the log like after a restart."""
        gone = [group for group in self.groups if shard_of(group, shards) == index]
        gone += [lobby for lobby in self.lobbies if shard_of(lobby, shards) == index]
        for group in gone:
            self._forget(group)
        self._metrics.groups.set(len(self.groups))
        return len(gone)

    def _forget(self, group: str) -> None:
        """Drop a group's state (its shard moved, or it ended): the log can rebuild it."""
        if is_lobby(group):
            del self.lobbies[group]
            self.routes.forget(group)
            return
        del self.groups[group]
        self.bots.stop(group)
        for grace in self._grace.pop(group, {}).values():
            grace.cancel()
        handle = self._flush_handles.pop(group, None)
        if handle is not None:
            handle.cancel()
        self._pending_origin.pop(group, None)
        self.routes.forget(group)
        self._directory.forget_group(group)

    # -- evicting ended groups ---------------------------------------------------------------

    def _evictable(self, state: GroupState | LobbyState) -> bool:
        """Its last period ended, nobody is connected, and no rate-limited flush is due; a
        lobby: every group is formed and nobody waits in it. A later input for either (someone
        back on an old link) rebuilds it from the log."""
        group = state.config.group
        if isinstance(state, LobbyState):
            done = state.next_group() is None and not state.waiting and not state.overdue
            return done and group not in self._applying
        return (
            state.state == "ended"
            and state.period == state.config.num_periods
            and not state.connections
            and not state.flush_pending
            and group not in self._flush_handles
            and group not in self._pending_origin
            and group not in self._applying
        )

    def _consider_eviction(self, state: GroupState | LobbyState) -> None:
        """Sweep `evict_after` seconds from now if the group may go (one sweep at a time)."""
        if self._sweep is None and self._evictable(state):
            self._sweep = asyncio.get_running_loop().call_later(
                self._evict_after, self._start_sweep
            )

    def _start_sweep(self) -> None:
        task = asyncio.get_running_loop().create_task(self._evict_ended())
        self._sweep = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _evict_ended(self) -> None:
        """Evict every evictable group whose rows are all in MongoDB.

        A group is evicted only if nothing was logged for it since the sweep began (its clock
        moves with every row): those rows might not be written yet, and a rebuild would miss
        them."""
        try:
            await self._evict_logged()
        finally:
            self._sweep = None
        for state in self._held_states():  # one that ended meanwhile: another sweep
            if self._evictable(state):
                self._consider_eviction(state)
                break

    def _held_states(self) -> list[GroupState | LobbyState]:
        return [*self.groups.values(), *self.lobbies.values()]

    async def _evict_logged(self) -> None:
        candidates = [(s, s.clock) for s in self._held_states() if self._evictable(s)]
        if not candidates:
            return
        unlogged = list(self._unlogged)
        if unlogged:
            await asyncio.wait(unlogged)
            if any(f.cancelled() or f.exception() is not None for f in unlogged):
                return  # a batch failed: its inputs come again; try on the next sweep
        await self._log_barrier()
        evicted = 0
        for state, clock in candidates:
            group = state.config.group
            unchanged = self._held(group) is state and state.clock == clock
            if unchanged and self._evictable(state):
                self._forget(group)
                evicted += 1
        self._metrics.groups.set(len(self.groups))
        if evicted:
            self._metrics.groups_evicted.inc(evicted)
            log.info("%d ended groups evicted; %d groups held", evicted, len(self.groups))

    def _add_to_log(self, records: list[LogRecord]) -> asyncio.Future[None]:
        """Hand records to the log writer, remembering their batch until it is confirmed."""
        written = self._log.add(records)
        if written not in self._unlogged:
            self._unlogged.add(written)
            written.add_done_callback(self._unlogged.discard)
        return written

    # -- gateway liveness --------------------------------------------------------------------

    async def on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = Envelope.decode(message.body)
        except ValueError:
            return
        if envelope.type is MessageType.GATEWAY_ALIVE and envelope.gateway is not None:
            self._heard[envelope.gateway] = asyncio.get_running_loop().time()

    async def watch_gateways(self, every: float = 0.5) -> None:
        """Disconnect the members of gateways that stopped sending heartbeats."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            if not self._bus.is_connected:
                # No heartbeat can arrive while the broker is away: count from its return.
                self._started = loop.time()
                self._heard.clear()
                continue
            for gateway in self.routes.gateways():
                last = self._heard.get(gateway, self._started)
                if loop.time() - last > self._liveness_timeout:
                    await self._gateway_gone(gateway)

    async def _gateway_gone(self, gateway: str) -> None:
        gone = self.routes.drop_gateway(gateway)
        self._heard.pop(gateway, None)
        log.warning("gateway %s is silent: %d participants disconnected", gateway, len(gone))
        self._metrics.gateways_lost.inc()
        for group, participant, connection in gone:
            if is_lobby(group):
                lobby = self.lobbies.get(group)
                if lobby is not None:
                    effects = lobby.on_presence(participant, connection, False, now=now())
                    await self._apply_now(lobby, effects)
                continue
            state = self.groups.get(group)
            if state is not None and state.may_finish("disconnect"):
                await self._refresh_labels(state)
                state = self.groups.get(group)
            if state is not None:
                await self._apply_now(state, state.disconnect(participant, connection, now=now()))

    # -- inputs ------------------------------------------------------------------------------

    async def handle(self, envelope: Envelope) -> Awaitable[None]:
        """Apply one input and start publishing its effects and log records, in order.

        Returns an awaitable that completes when the broker confirmed every effect and the log
        batch holding this input's records; the caller acknowledges the input then, while the
        next input is already being handled.
        """
        if is_lobby(envelope.group):
            return await self._handle_lobby(envelope)
        started = time.perf_counter()
        state = await self._state(envelope.group)
        finishing = _finishing(envelope)
        if state is not None and finishing is not None and state.may_finish(finishing):
            await self._refresh_labels(state)
            if self.groups.get(envelope.group) is not state:  # dropped meanwhile: rebuilt
                state = await self._state(envelope.group)
        if state is None:
            log.warning(
                "input for unknown group %s dropped",
                envelope.group,
                extra=context(envelope.session, envelope.group, message_id=envelope.id),
            )
            return completed()
        records: list[LogRecord] = []
        origin: float | None = None  # a new frame: when its gateway received it
        if envelope.type is MessageType.FRAME_ACCEPTED and not state.seen(
            envelope.participant or "", envelope.seq or 0
        ):
            # Its place in the group's order (PROTOCOL v1.1 Timestamps). The clock moves only
            # for rows of the log, so that a rebuild's fold moves it the same way.
            ts = state.stamp(now())
            records.append(inbound_record(envelope, ts))
            origin = envelope.ts
        else:
            ts = now()
            if envelope.type is MessageType.FRAME_ACCEPTED:
                self._metrics.duplicate.inc()
        self.routes.learn(envelope)
        effects = self._apply_input(state, envelope, ts)
        if origin is not None:
            self._count_frame(state, envelope, effects, origin)
        publishes = self._carry_out(state, effects, records, origin)
        self._metrics.input[envelope.type].inc()
        written = self._add_to_log(records) if records else None
        if state.state == "ended":  # checked further only once the group is over
            self._consider_eviction(state)
        return self._confirmed(state, publishes, written, started)

    async def _confirmed(
        self,
        state: GroupState | LobbyState,
        publishes: list[asyncio.Future[None]],
        written: asyncio.Future[None] | None,
        started: float,
    ) -> None:
        """Until the input's outputs are confirmed. If they fail, the input goes back to its
        queue, but this state has applied it: handled again, it would be a duplicate and its
        rows would never reach the log. So the group's state is dropped, and rebuilt from the
        log (once the log holds every batch sent before) when the input comes back."""
        try:
            if publishes:
                await asyncio.gather(*publishes)
            if written is not None:
                await written
        except BaseException:
            group = state.config.group
            if self._held(group) is state:
                log.warning(
                    "outputs of an input of group %s failed: its state is rebuilt from the log",
                    group,
                    extra=context(state.config.session, group),
                )
                self._forget(group)
                self._tainted.add(group)
                self._metrics.groups.set(len(self.groups))
            raise
        self._metrics.handle_seconds.observe(time.perf_counter() - started)

    def _held(self, group: str) -> GroupState | LobbyState | None:
        """The state this worker holds for a group or a lobby, if any."""
        return self.lobbies.get(group) if is_lobby(group) else self.groups.get(group)

    async def _await_tainted(self, group: str) -> None:
        """Before rebuilding a group whose dropped state sent rows that may still be on their
        way to the store: until the log holds them."""
        if group in self._tainted:
            unlogged = list(self._unlogged)
            if unlogged:
                await asyncio.wait(unlogged)
            await self._log_barrier()
            self._tainted.discard(group)

    # -- lobbies (PROTOCOL v2 "The lobby") -----------------------------------------------------

    async def _handle_lobby(self, envelope: Envelope) -> Awaitable[None]:
        """Apply one input of a lobby, form the groups it makes possible, and publish.

        A group is formed in the store first (`Directory.form_group`: MongoDB decides, once),
        then logged and announced; the store's members win over the proposal."""
        started = time.perf_counter()
        found = await self._lobby(envelope.session)
        if found is None:
            log.warning(
                "input for the lobby of unknown session %s dropped",
                envelope.session,
                extra=context(envelope.session, "", message_id=envelope.id),
            )
            return completed()
        lobby, effects = found
        self.routes.learn(envelope)
        effects.extend(self._apply_lobby_input(lobby, envelope, now()))
        effects.extend(await self._form_groups(lobby))
        records: list[LogRecord] = []
        publishes = self._carry_out(lobby, effects, records)
        self._metrics.input[envelope.type].inc()
        written = self._add_to_log(records) if records else None
        self._consider_eviction(lobby)
        return self._confirmed(lobby, publishes, written, started)

    def _apply_lobby_input(
        self, lobby: LobbyState, envelope: Envelope, ts: float
    ) -> list[LobbyEffect]:
        if envelope.type is MessageType.PRESENCE_CHANGED:
            if envelope.participant is None or envelope.connection is None:
                return []
            connected = PresenceChanged.of(envelope).connected
            return lobby.on_presence(envelope.participant, envelope.connection, connected, now=ts)
        if envelope.type is MessageType.TIMER_FIRED:
            woke = WokeUp.of(envelope)
            participant = woke.participant or envelope.participant or ""
            return lobby.on_timer(woke.event, participant, now=ts, at=woke.at)
        # Frames never come here: the gateway answers a lobby connection's frames itself.
        log.error("unexpected %s for a lobby: %s", envelope.type, envelope.id)
        return []

    async def _form_groups(self, lobby: LobbyState) -> list[LobbyEffect]:
        """Every group the lobby can form now, formed in the store, in order: with bots for
        people whose deadline passed (`on_lobby_timeout: bots`; released when the session has
        no free seat left for them), then from the people waiting."""
        effects: list[LobbyEffect] = []
        session = lobby.config.session
        while True:
            with_bots = lobby.bot_proposal()
            if with_bots is not None:
                group, members, bots = with_bots
            else:
                proposal = lobby.proposal()
                if proposal is None:
                    return effects
                (group, members), bots = proposal, 0
            try:
                formed, played = await self._store_call(
                    partial(self._directory.form_group, session, group, members, bots), group
                )
            except NotFound:  # the session was deleted, or the store has no such group
                log.error("group %s of the lobby of %s cannot be formed", group, session)
                return effects
            except NoFreeSeats:
                log.info("no free seats for bots in %s: releasing %s", session, members[0])
                effects.extend(lobby.release(members[0], now=now()))
                continue
            effects.extend(lobby.form(group, formed, now=now(), bots=played))
            log.info(
                "group %s formed from the lobby: %s%s",
                group,
                ", ".join(formed),
                f" (bots: {', '.join(played)})" if played else "",
                extra=context(session, group),
            )

    async def _store_call(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """`call` retried while the store is unreachable (keeping the lobby's order)."""
        delay = 0.1
        while True:
            try:
                return await call()
            except httpx.HTTPError as exc:
                log.warning("store unreachable for %s (%s); retrying", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _lobby(self, session: str) -> tuple[LobbyState, list[LobbyEffect]] | None:
        """The lobby's state, rebuilt from its log if this worker does not hold it; with the
        effects a rebuild owes: groups the store formed that the log does not show (a worker
        died between the two), and every waiting person's wake-up, asked for again."""
        group = lobby_group(session)
        held = self.lobbies.get(group)
        if held is not None:
            return held, []
        await self._await_tainted(group)
        delay = 0.1
        while True:
            try:
                config = await self._directory.lobby(session)
                rows = await self._directory.lobby_log(session)
                break
            except NotFound:
                return None
            except httpx.HTTPError as exc:
                log.warning("store unreachable for the lobby of %s (%s); retrying", session, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        held = self.lobbies.get(group)  # another shard consumer may have raced us here
        if held is not None:
            return held, []
        lobby = rebuild_lobby(config, rows)
        self.lobbies[group] = lobby
        effects: list[LobbyEffect] = []
        for formed_group in config.groups:
            members = config.formed.get(formed_group)
            if members and formed_group not in lobby.formed:
                # Asked again, the store answers the group as formed, with the seats bots play
                # (which are no arrivals to log), and gives seats their group if left undone.
                try:
                    stored, played = await self._store_call(
                        partial(self._directory.form_group, session, formed_group, members),
                        formed_group,
                    )
                except NotFound:
                    continue
                effects.extend(lobby.form(formed_group, stored, now=now(), bots=played))
        effects.extend(lobby.ensure_wake())  # the first in line's, asked for again
        if any(w.connection == UNKNOWN for w in lobby.waiting.values()):
            loop = asyncio.get_running_loop()
            wait = max(0.0, self._started + self._resync_window - loop.time())
            loop.call_later(wait, lambda: self._start_task(self._expire_lobby(lobby)))
        if rows:
            log.info("lobby of %s rebuilt from %d log rows", session, len(rows))
        return lobby, effects

    async def _expire_lobby(self, lobby: LobbyState) -> None:
        await self._apply_now(lobby, lobby.expire_unknown(now()))

    def _count_frame(
        self, state: GroupState, envelope: Envelope, effects: list[Effect], origin: float
    ) -> None:
        """Applied or rejected (by reason); coalesced when the rate limit holds it back."""
        for effect in effects:
            if isinstance(effect, Broadcast) and effect.channel == Channel.ERROR:
                self._metrics.rejection(str(effect.payload["code"])).inc()
                return
        self._metrics.applied.inc()
        if envelope.channel == "decisions" and state.flush_pending:
            self._metrics.coalesced.inc()
            self._pending_origin.setdefault(state.config.group, origin)

    def _apply_input(self, state: GroupState, envelope: Envelope, ts: float) -> list[Effect]:
        if envelope.type is MessageType.FRAME_ACCEPTED:
            if envelope.participant is None or envelope.seq is None or envelope.channel is None:
                log.error("FrameAccepted without participant/seq/channel: %s", envelope.id)
                return []
            # The participant's decision: the researcher's JSON, checked by the state machine.
            decision, channel = envelope.payload, envelope.channel
            return state.on_frame(envelope.participant, envelope.seq, channel, decision, ts)
        if envelope.type is MessageType.PRESENCE_CHANGED:
            if envelope.participant is None or envelope.connection is None:
                log.error("PresenceChanged without participant/connection: %s", envelope.id)
                return []
            connected = PresenceChanged.of(envelope).connected
            return state.on_presence(envelope.participant, envelope.connection, connected, now=ts)
        if envelope.type is MessageType.TIMER_FIRED:
            tick = TimerFired.of(envelope)
            return state.on_timer(
                tick.event, tick.period, tick.index, tick.ends_at, now=ts, late=tick.late
            )
        log.error("unexpected %s on a shard queue: %s", envelope.type, envelope.id)
        return []

    async def _state(self, group: str) -> GroupState | None:
        state = self.groups.get(group)
        if state is not None:
            return state
        await self._await_tainted(group)  # its dropped state's rows may be on their way
        delay = 0.1
        while True:  # the store is briefly unreachable: wait, keeping the group's order
            try:
                config = await self._directory.group(group)
                started = time.perf_counter()
                rows = await self._directory.group_log(group)
                break
            except NotFound:
                return None
            except httpx.HTTPError as exc:
                log.warning("store unreachable for group %s (%s); retrying", group, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        state = self.groups.get(group)  # another shard consumer may have raced us here
        if state is None:
            state = self._rebuilt(config, rows, started)
            self.groups[group] = state
            self._metrics.groups.set(len(self.groups))
        return state

    def _rebuilt(
        self, config: GroupConfig, rows: list[dict[str, Any]], started: float
    ) -> GroupState:
        state = rebuild(config, experiments.get(config.experiment), rows)
        if rows:
            seconds = time.perf_counter() - started
            self._metrics.rebuilds.inc()
            self._metrics.rebuild_seconds.observe(seconds)
            log.info(
                "group %s rebuilt from %d log rows in %.3f s",
                config.group,
                len(rows),
                seconds,
                extra=context(config.session, config.group),
            )
        if state.flush_pending:  # the rate limit's trailing edge had not gone out
            self._schedule_flush(state, state.last_broadcast_at + config.rate_limit)
        if UNKNOWN in state.connections.values():
            loop = asyncio.get_running_loop()
            wait = max(0.0, self._started + self._resync_window - loop.time())
            loop.call_later(wait, lambda: self._start_task(self._expire_unknown(state)))
        for code, since in state.away_since.items():  # grace timers are not in the log
            self._grace_for(state, code, since + config.dropout_grace)
        return state

    async def _refresh_labels(self, state: GroupState) -> None:
        """The group's labels as the store has them now, into its state (see the module
        docstring); the labels known so far if the store stays unreachable."""
        config = state.config
        delay = LABEL_RETRY_DELAY
        for attempt in range(1, LABEL_READS + 1):
            try:
                fresh = await self._directory.group_fresh(config.group)
            except NotFound:
                return  # the session was deleted: it ends with what it has
            except httpx.HTTPError as exc:
                if attempt == LABEL_READS:
                    log.error(
                        "store unreachable (%s): group %s ends with the labels it knows",
                        exc,
                        config.group,
                        extra=context(config.session, config.group),
                    )
                    return
                await asyncio.sleep(delay)
                delay *= 2
            else:
                state.labels = {**state.labels, **fresh.labels}
                return

    async def _expire_unknown(self, state: GroupState) -> None:
        if UNKNOWN in state.connections.values() and state.may_finish("disconnect"):
            await self._refresh_labels(state)
        effects = state.expire_unknown(now())
        if effects:
            log.info("group %s: members not announced again are disconnected", state.config.group)
        await self._apply_now(state, effects)

    async def _apply_now(
        self,
        state: GroupState | LobbyState,
        effects: list[Effect] | list[LobbyEffect],
        origin: float | None = None,
        *,
        first: list[LogRecord] | None = None,
    ) -> None:
        """Carry out effects produced outside the shard queue's order (timers of our own, a
        bot's input); `first`: rows to log before theirs (the bot's `in` row)."""
        if not (effects or first) or self._held(state.config.group) is not state:
            return  # nothing to do, or the group moved to another worker meanwhile
        group = state.config.group
        self._applying[group] = self._applying.get(group, 0) + 1
        try:
            records: list[LogRecord] = list(first or [])
            publishes = self._carry_out(state, effects, records, origin)
            await asyncio.gather(*publishes)
            if records:
                await self._add_to_log(records)
        finally:
            if self._applying[group] == 1:
                del self._applying[group]
            else:
                self._applying[group] -= 1
        self._consider_eviction(state)

    def _start_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _carry_out(
        self,
        state: GroupState | LobbyState,
        effects: list[Effect] | list[LobbyEffect],
        records: list[LogRecord],
        origin: float | None = None,
    ) -> list[asyncio.Future[None]]:
        """Hand every effect to its publisher, in effect order; futures of their confirms.

        A gateway's batcher keeps the order it was given, so each gateway receives a group's
        frames in the order they were produced. `origin`: the receipt time of the frame that
        caused these effects; its group broadcasts carry it and measure end-to-end latency.
        """
        config = state.config
        tasks: list[asyncio.Future[None]] = []
        for effect in effects:
            if isinstance(effect, Broadcast | Control):
                logged = isinstance(effect, Broadcast)
                to_group = logged and effect.participant is None and origin is not None
                envelope = Envelope(
                    type=MessageType.BROADCAST if logged else MessageType.CONTROL,
                    session=config.session,
                    group=config.group,
                    participant=effect.participant,
                    seq=effect.seq if isinstance(effect, Broadcast) else None,
                    connection=effect.connection if isinstance(effect, Control) else None,
                    channel=effect.channel,
                    ts=_stamp(state, effect) if isinstance(effect, Broadcast) else now(),
                    origin=origin if to_group else None,
                    payload=effect.payload,
                )
                tasks.extend(self._send(envelope))
                if logged:
                    records.append(_out_record(envelope))
                if to_group and origin is not None:  # handed to the batchers: out right away
                    self._metrics.end_to_end_seconds.observe(envelope.ts - origin)
                self._metrics.broadcast(effect.channel).inc()
            elif isinstance(effect, StartPeriod | PausePeriod | ResumePeriod):
                kind, command = _timers_command(effect)
                envelope = Envelope[TimersPayload](
                    type=kind, session=config.session, group=config.group, payload=command
                )
                tasks.append(self._publish(COMMANDS, TIMERS_KEY, envelope, mandatory=True))
            elif isinstance(effect, FlushAt) and isinstance(state, GroupState):
                self._schedule_flush(state, effect.at)
            elif isinstance(effect, BotAfter) and isinstance(state, GroupState):
                self._grace_for(state, effect.participant, effect.at)
            elif isinstance(effect, Record):  # a lobby's own event: logged, sent to nobody
                envelope = Envelope(
                    type=MessageType.BROADCAST,
                    session=config.session,
                    group=config.group,
                    participant=effect.participant,
                    channel=effect.channel,
                    ts=effect.ts if effect.ts is not None else state.stamp(now()),
                    payload=effect.payload,
                )
                records.append(_out_record(envelope))
            elif isinstance(effect, WakeAt):
                envelope = Envelope[messages.WakeAt](
                    type=MessageType.WAKE_AT,
                    session=config.session,
                    group=config.group,
                    participant=effect.participant,
                    payload=messages.WakeAt(at=effect.at, participant=effect.participant),
                )
                tasks.append(self._publish(COMMANDS, TIMERS_KEY, envelope, mandatory=True))
        if isinstance(state, GroupState) and state.bots:
            self.bots.ensure(state)
        return tasks

    # -- bots (PROTOCOL v2 "Online studies"; services.decisions.botplay) ----------------------

    def _grace_for(self, state: GroupState, participant: str, at: float) -> None:
        """A bot takes over `participant` at `at`, unless they are back by then."""
        group = state.config.group
        handles = self._grace.setdefault(group, {})
        if participant in handles:
            handles[participant].cancel()

        def due() -> None:
            handles.pop(participant, None)
            self._start_task(self._bot_takes_over(state, participant))

        handles[participant] = asyncio.get_running_loop().call_later(max(0.0, at - now()), due)

    async def _bot_takes_over(self, state: GroupState, participant: str) -> None:
        if self.groups.get(state.config.group) is state:
            await self._apply_now(state, state.bot_takes_over(participant, now()))

    async def _apply_bot(self, state: GroupState, code: str, channel: str, payload: Any) -> None:
        """One input of a bot for the member it plays: its `in` row (no seq), then its
        effects, like a frame's."""
        if self.groups.get(state.config.group) is not state:
            return
        config = state.config
        ts = state.stamp(now())
        record = LogRecord(
            id=f"bot:{new_id()}",
            ts=ts,
            session=config.session,
            group=config.group,
            participant=code,
            direction="in",
            channel=channel,
            seq=None,
            value=payload,
        )
        effects = state.on_bot_input(code, channel, payload, ts)
        await self._apply_now(state, effects, first=[record])

    def _send(self, envelope: Envelope) -> list[asyncio.Future[None]]:
        """Queue a frame out to the gateways that hold its addressees (none: nobody is here)."""
        routes = self.routes
        if envelope.participant is None:
            gateways = routes.group(envelope.group)
        else:
            gateway = routes.member(envelope.group, envelope.participant, envelope.connection)
            gateways = {gateway} if gateway is not None else set()
        return [self._output(gateway).add(envelope) for gateway in gateways]

    def _output(self, gateway: str) -> Batcher:
        batcher = self._outputs.get(gateway)
        if batcher is None:
            # Not mandatory: a gateway that went away takes its queue with it, and its
            # participants resynchronise from `hello` on the gateway they reconnect to.
            batcher = Batcher(
                self._bus,
                DEFAULT,
                gateway,
                mandatory=False,
                reliable=True,
                on_batch=self._metrics.batch_items.observe,
            )
            self._outputs[gateway] = batcher
        return batcher

    def _publish(
        self, exchange: str, key: str, envelope: Envelope, *, mandatory: bool
    ) -> asyncio.Task[None]:
        return asyncio.create_task(
            self._bus.publish_reliably(exchange, key, envelope, mandatory=mandatory)
        )

    def _schedule_flush(self, state: GroupState, at: float) -> None:
        group = state.config.group
        loop = asyncio.get_running_loop()
        if group in self._flush_handles:
            self._flush_handles[group].cancel()
        delay = max(0.0, at - now())
        self._flush_handles[group] = loop.call_later(delay, self._start_flush, state)

    def _start_flush(self, state: GroupState) -> None:
        self._flush_handles.pop(state.config.group, None)
        self._start_task(self._flush(state))

    async def _flush(self, state: GroupState) -> None:
        origin = self._pending_origin.pop(state.config.group, None)
        try:
            await self._apply_now(state, state.flush(now()), origin)
        except Exception:
            # The bus is reconnecting: keep the change pending and try again shortly.
            log.exception("rate-limited flush of group %s failed; retrying", state.config.group)
            state.flush_pending = True
            if origin is not None:
                self._pending_origin.setdefault(state.config.group, origin)
            self._schedule_flush(state, now() + 0.5)

    async def close(self) -> None:
        await self.bots.close()
        for handles in self._grace.values():
            for handle in handles.values():
                handle.cancel()
        for handle in self._flush_handles.values():
            handle.cancel()
        if isinstance(self._sweep, asyncio.TimerHandle):
            self._sweep.cancel()
        for task in self._tasks:
            task.cancel()
        for batcher in self._outputs.values():
            try:  # frames not sent by then are resent: their inputs were never acknowledged
                await asyncio.wait_for(batcher.close(), 5.0)
            except TimeoutError:
                log.warning("frames to a gateway were still unconfirmed at shutdown")
