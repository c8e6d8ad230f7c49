"""Bus handlers of the decisions service: feed each group's inputs to its `GroupState`.

One consumer per shard queue handles messages one at a time, so a group's inputs are applied in
the one order the broker holds them in. Effects are published (with confirms) before the input
is acknowledged, so a crash between the two replays the input instead of losing its output.

`DecisionsWorker` holds the groups and lobbies of this worker's shards and routes each input to
its state machine: frames, presence and ticks of a group (`handle`), a lobby's arrivals and
wake-ups (`_handle_lobby`), and the inputs the worker makes itself (a rate-limited flush that
is due, a member not announced again, a gateway gone silent, a bot's turn; `_apply_now`). A
group not held is rebuilt from its log first. The rest is in parts of one idea each, which the
worker composes:

- `Routes` (services.decisions.routes): which gateway holds which member's connection;
- `Liveness` (services.decisions.liveness): gateways' heartbeats and the resync window;
- `Outputs` (services.decisions.outputs): effects published to the gateways and the timers,
  log rows handed to the log writer, the rate limit's flushes;
- `Moves` (services.decisions.moves): the log barrier, shards taken over and handed over,
  ended groups evicted, a group dropped after its outputs failed;
- `BotPlayer` (services.decisions.botplay): the seats bots play.

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
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Literal, TypeVar

import httpx
from aio_pika.abc import AbstractIncomingMessage

from services.common.bus import completed
from services.common.bus.batcher import all_of
from services.common.directory import GroupConfig, NoFreeSeats, NotFound
from services.common.experiments import Registry
from services.common.group import UNKNOWN, BotAfter, Broadcast, Effect, GroupState, rebuild
from services.common.lobby import LobbyConfig, LobbyEffect, LobbyState
from services.common.lobby import rebuild as rebuild_lobby
from services.common.logs import context
from services.common.messages import (
    Channel,
    Envelope,
    LogRecord,
    MessageType,
    PresenceChanged,
    TimerFired,
    WokeUp,
    inbound_record,
    is_lobby,
    lobby_group,
    new_id,
    now,
)
from services.common.ports import GroupDirectory, Publisher
from services.common.retry import retry_forever
from services.decisions.botplay import BotPlayer
from services.decisions.liveness import Liveness
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.decisions.moves import Moves
from services.decisions.outputs import Outputs
from services.decisions.routes import Routes

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reads of a group's labels before its last period ends: tries, and the first retry's delay
# (doubling). A store away longer does not hold the group's end: the labels known so far go.
LABEL_READS = 5
LABEL_RETRY_DELAY = 0.1
# Reads and calls that must wait for the store (a rebuild, a lobby's group formed): the first
# retry's delay, doubling up to the longest.
STORE_RETRY_DELAY = 0.1
STORE_RETRY_MAX_DELAY = 5.0


async def _while_store_away(action: Callable[[], Awaitable[T]], what: str) -> T:
    """`action` retried while the store cannot be reached (0.1 s, doubling to 5 s): an input
    waits for the store rather than being applied out of order. What the store answers is
    raised at once: NotFound (the session was deleted) ends the wait, as NoFreeSeats does."""
    return await retry_forever(
        action,
        what,
        retry_on=(httpx.HTTPError,),
        give_up_on=(NotFound, NoFreeSeats),
        first_delay=STORE_RETRY_DELAY,
        max_delay=STORE_RETRY_MAX_DELAY,
    )


def _finishing(envelope: Envelope) -> Literal["period_end", "disconnect"] | None:
    """What kind of input that may end a group's last period `envelope` is (None: not one)."""
    if envelope.type is MessageType.TIMER_FIRED:
        return "period_end" if TimerFired.of(envelope).event == "period_end" else None
    if envelope.type is MessageType.PRESENCE_CHANGED:
        return None if PresenceChanged.of(envelope).connected else "disconnect"
    return None


class DecisionsWorker:
    """The groups and lobbies this worker holds, and the inputs that change them."""

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
        experiments: Registry | None = None,
    ) -> None:
        """`experiments`: the registry of the experiments its groups run (the service's, made
        at its start; the built-ins alone when not given)."""
        self._experiments = Registry.builtin() if experiments is None else experiments
        self._directory = directory
        self._metrics = metrics
        self.groups: dict[str, GroupState] = {}
        # Arrival sessions' lobbies by their bus address (services.common.lobby).
        self.lobbies: dict[str, LobbyState] = {}
        # Seats bots play (on_disconnect / on_lobby_timeout bots), and the grace timers
        # before a bot takes over a member who left (group → member → handle).
        self.bots = BotPlayer(self._apply_bot, self.held)
        self._grace: dict[str, dict[str, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.routes = Routes()
        self.liveness = Liveness(
            bus,
            self.routes,
            metrics,
            self._disconnected,
            resync_window=resync_window,
            liveness_timeout=liveness_timeout,
        )
        self.outputs = Outputs(bus, metrics, log_writer, self.routes, self._apply_now)
        self.moves = Moves(bus, directory, metrics, self.outputs, self, evict_after=evict_after)

    # -- start-up and shard moves (services.decisions.moves) ---------------------------------

    async def wait_for_log(self, *, poll: float = 0.02, resend_after: float = 10.0) -> float:
        """Wait until the store wrote everything sent to the log before now; seconds waited."""
        waited = await self.moves.wait_for_log(poll=poll, resend_after=resend_after)
        self.liveness.start()  # the resync window and heartbeat silence count from here
        return waited

    async def request_resync(self, shards: list[int] | None = None) -> None:
        """Ask every gateway to announce its open connections again (after taking shards
        over): those of the groups in `shards`, or all."""
        await self.moves.request_resync(shards)

    def forget_shard(self, index: int, shards: int) -> int:
        """Drop the state of the groups of a shard handed to another worker; how many."""
        return self.moves.forget_shard(index, shards)

    def held(self, group: str) -> GroupState | LobbyState | None:
        """The state this worker holds for a group or a lobby, if any."""
        return self.lobbies.get(group) if is_lobby(group) else self.groups.get(group)

    def forget(self, group: str) -> None:
        """Drop a group's state (its shard moved, it ended, its outputs failed): the log can
        rebuild it. What is kept beside it goes too: bots, grace and flush timers, routes."""
        if is_lobby(group):
            del self.lobbies[group]
            self.routes.forget(group)
            return
        del self.groups[group]
        self.bots.stop(group)
        for grace in self._grace.pop(group, {}).values():
            grace.cancel()
        self.outputs.forget(group)
        self.routes.forget(group)
        self._directory.forget_group(group)

    async def _evict_ended(self) -> None:
        """The eviction sweep, now (the tests' way to run it without waiting)."""
        await self.moves.evict_ended()

    # -- gateway liveness (services.decisions.liveness) --------------------------------------

    async def on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        await self.liveness.on_heartbeat(message)

    async def watch_gateways(self, every: float = 0.5) -> None:
        """Disconnect the members of gateways that stopped sending heartbeats."""
        await self.liveness.watch(every)

    async def _disconnected(self, group: str, participant: str, connection: str) -> None:
        """A member of a gateway gone silent leaves their group or lobby."""
        if is_lobby(group):
            lobby = self.lobbies.get(group)
            if lobby is not None:
                effects = lobby.on_presence(participant, connection, False, now=now())
                await self._apply_now(lobby, effects)
            return
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
        written = self.outputs.log(records) if records else None
        if state.state == "ended":  # checked further only once the group is over
            self.moves.consider_eviction(state)
        return self._confirmed(state, publishes, written, started)

    def _confirmed(
        self,
        state: GroupState | LobbyState,
        publishes: list[asyncio.Future[None]],
        written: asyncio.Future[None] | None,
        started: float,
    ) -> asyncio.Future[None]:
        """A future that completes when the input's outputs are confirmed, and fails as the
        first of them that failed. If they fail, the input goes back to its queue, but this
        state has applied it: handled again, it would be a duplicate and its rows would never
        reach the log. So the group's state is dropped, and rebuilt from the log (once the log
        holds every batch sent before) when the input comes back.

        A future with a callback, not a coroutine: the consumer then acknowledges the input
        from a callback too, with no task per input (`consume_pipelined`)."""
        parts = [*publishes, written] if written is not None else publishes
        done = all_of(parts) if parts else completed()
        done.add_done_callback(partial(self._outputs_settled, state, started))
        return done

    def _outputs_settled(
        self, state: GroupState | LobbyState, started: float, done: asyncio.Future[None]
    ) -> None:
        if not done.cancelled() and done.exception() is None:
            self._metrics.handle_seconds.observe(time.perf_counter() - started)
            return
        group = state.config.group
        if self.held(group) is state:
            log.warning(
                "outputs of an input of group %s failed: its state is rebuilt from the log",
                group,
                extra=context(state.config.session, group),
            )
            self.moves.drop(group)

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
        written = self.outputs.log(records) if records else None
        self.moves.consider_eviction(lobby)
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
        """`call` retried while the store is unreachable (keeping the lobby's order); what
        the store answers (NotFound, NoFreeSeats) is raised at once."""
        return await _while_store_away(call, f"the store's answer for {what}")

    async def _lobby(self, session: str) -> tuple[LobbyState, list[LobbyEffect]] | None:
        """The lobby's state, rebuilt from its log if this worker does not hold it; with the
        effects a rebuild owes: groups the store formed that the log does not show (a worker
        died between the two), and every waiting person's wake-up, asked for again."""
        group = lobby_group(session)
        held = self.lobbies.get(group)
        if held is not None:
            return held, []
        await self.moves.before_rebuild(group)

        async def read() -> tuple[LobbyConfig, list[dict[str, Any]]]:
            return await self._directory.lobby(session), await self._directory.lobby_log(session)

        try:
            config, rows = await _while_store_away(read, f"reading the lobby of {session}")
        except NotFound:
            return None
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
            self.liveness.after_resync(lambda: self._start_task(self._expire_lobby(lobby)))
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
            self.outputs.coalesced(state.config.group, origin)

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
        await self.moves.before_rebuild(group)  # its dropped state's rows may be on their way

        async def read() -> tuple[GroupConfig, list[dict[str, Any]], float]:
            config = await self._directory.group(group)
            started = time.perf_counter()
            return config, await self._directory.group_log(group), started

        try:  # the store is briefly unreachable: wait, keeping the group's order
            config, rows, started = await _while_store_away(read, f"reading group {group}")
        except NotFound:
            return None
        state = self.groups.get(group)  # another shard consumer may have raced us here
        if state is None:
            state = self._rebuilt(config, rows, started)
            self.groups[group] = state
            self._metrics.groups.set(len(self.groups))
        return state

    def _rebuilt(
        self, config: GroupConfig, rows: list[dict[str, Any]], started: float
    ) -> GroupState:
        state = rebuild(config, self._experiments.get(config.experiment), rows)
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
            self.outputs.schedule_flush(state, state.last_broadcast_at + config.rate_limit)
        if UNKNOWN in state.connections.values():
            self.liveness.after_resync(lambda: self._start_task(self._expire_unknown(state)))
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
                state.learn_labels(fresh.labels)
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
        if not (effects or first) or self.held(state.config.group) is not state:
            return  # nothing to do, or the group moved to another worker meanwhile
        with self.outputs.carrying(state.config.group):
            records: list[LogRecord] = list(first or [])
            publishes = self._carry_out(state, effects, records, origin)
            await asyncio.gather(*publishes)
            if records:
                await self.outputs.log(records)
        self.moves.consider_eviction(state)

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
        """Hand every effect to its publisher (`Outputs.carry_out`); futures of their confirms.
        A bot's grace timer is started here, and the group's bots set playing."""
        publishes = self.outputs.carry_out(state, effects, records, origin)
        if isinstance(state, GroupState):
            for effect in effects:
                if isinstance(effect, BotAfter):
                    self._grace_for(state, effect.participant, effect.at)
            if state.bots:
                self.bots.ensure(state)
        return publishes

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

    async def close(self) -> None:
        await self.bots.close()
        for handles in self._grace.values():
            for handle in handles.values():
                handle.cancel()
        self.outputs.stop()
        self.moves.stop()
        for task in self._tasks:
            task.cancel()
        await self.outputs.close()
