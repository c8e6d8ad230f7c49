"""Decisions' way out: a group's effects turned into messages, log rows and flush timers.

A state machine's effects (services.common.group, services.common.lobby) become: frames out to
the gateways that hold their addressees (`Routes`), one `Batcher` per gateway queue, which
sends what the inputs of one moment produced for it as one message and keeps the order it was
given, so each gateway receives a group's frames in the order they were produced; commands to
the timers; log rows, handed to the log writer (services.decisions.log), whose batches are
remembered until confirmed, so that a shard move or an eviction can wait for the log to hold
them (services.decisions.moves); and the rate limit's trailing edge, a timer per group that
applies `GroupState.flush` when it is due. Every publish returns a future of its confirm: the
input that caused it is acknowledged only once they all completed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from services.common import messages
from services.common.bus import COMMANDS, DEFAULT, TIMERS_KEY, Batcher
from services.common.group import (
    Broadcast,
    Control,
    Effect,
    FlushAt,
    GroupState,
    PausePeriod,
    ResumePeriod,
    StartPeriod,
    TimersCommand,
)
from services.common.lobby import LobbyEffect, LobbyState, Record, WakeAt
from services.common.messages import (
    Envelope,
    LogRecord,
    MessageType,
    is_lobby,
    now,
    outbound_record,
)
from services.common.ports import Publisher
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.decisions.routes import Routes

log = logging.getLogger(__name__)

# A rate-limited flush that failed (the bus is reconnecting) is tried again this much later.
FLUSH_RETRY_SECONDS = 0.5

# The payload of a command to the timers (a union, not their base class: pydantic serializes a
# field by its declared type, and `Payload` has no fields).
TimersPayload = messages.StartPeriod | messages.PausePeriod | messages.ResumePeriod

# Carries out a group's effects outside the shard queue's order (the worker's `_apply_now`):
# state, effects, and the receipt time of the oldest decision they carry.
Apply = Callable[[GroupState, list[Effect], float | None], Awaitable[None]]


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


def _out_record(envelope: Envelope) -> LogRecord:
    """The log row of a frame out; a lobby's rows have the group "" (PROTOCOL v2)."""
    record = outbound_record(envelope)
    return record.model_copy(update={"group": ""}) if is_lobby(record.group) else record


def _stamp(state: GroupState | LobbyState, broadcast: Broadcast) -> float:
    """A broadcast's row `ts`: the state machine's (ticks), or the group's next one."""
    return broadcast.ts if broadcast.ts is not None else state.stamp(now())


class Outputs:
    """Publishes effects (gateways, timers), hands log rows over, and runs the rate limit's
    flushes; knows which groups still have outputs on their way (`busy`)."""

    def __init__(
        self,
        bus: Publisher,
        metrics: DecisionsMetrics,
        log_writer: LogWriter,
        routes: Routes,
        apply: Apply,
    ) -> None:
        self._bus = bus
        self._metrics = metrics
        self._log = log_writer
        self._routes = routes
        self._apply = apply
        self._batchers: dict[str, Batcher] = {}  # gateway queue → its batcher
        self._flush_handles: dict[str, asyncio.TimerHandle] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        # group → receipt time of the oldest decision a pending rate-limited flush carries.
        self._pending_origin: dict[str, float] = {}
        self._unlogged: set[asyncio.Future[None]] = set()  # log batches not confirmed yet
        # Groups whose effects are being carried out outside the shard queue's order.
        self._carrying: dict[str, int] = {}

    def carry_out(
        self,
        state: GroupState | LobbyState,
        effects: list[Effect] | list[LobbyEffect],
        records: list[LogRecord],
        origin: float | None = None,
    ) -> list[asyncio.Future[None]]:
        """Hand every effect to its publisher, in effect order; futures of their confirms.

        Logged effects append their rows to `records` (the caller hands them to the log, after
        the input's own). `origin`: the receipt time of the frame that caused these effects;
        its group broadcasts carry it and measure end-to-end latency. A `BotAfter` is not an
        output: the worker carries it out.
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
                self.schedule_flush(state, effect.at)
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
        return tasks

    def _send(self, envelope: Envelope) -> list[asyncio.Future[None]]:
        """Queue a frame out to the gateways that hold its addressees (none: nobody is here)."""
        routes = self._routes
        if envelope.participant is None:
            gateways = routes.group(envelope.group)
        else:
            gateway = routes.member(envelope.group, envelope.participant, envelope.connection)
            gateways = {gateway} if gateway is not None else set()
        return [self._batcher(gateway).add(envelope) for gateway in gateways]

    def _batcher(self, gateway: str) -> Batcher:
        batcher = self._batchers.get(gateway)
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
            self._batchers[gateway] = batcher
        return batcher

    def _publish(
        self, exchange: str, key: str, envelope: Envelope, *, mandatory: bool
    ) -> asyncio.Task[None]:
        return asyncio.create_task(
            self._bus.publish_reliably(exchange, key, envelope, mandatory=mandatory)
        )

    # -- the log -----------------------------------------------------------------------------

    def log(self, records: list[LogRecord]) -> asyncio.Future[None]:
        """Hand records to the log writer, remembering their batch until it is confirmed."""
        written = self._log.add(records)
        if written not in self._unlogged:
            self._unlogged.add(written)
            written.add_done_callback(self._unlogged.discard)
        return written

    async def all_logged(self) -> bool:
        """Until every log batch handed over so far is settled; whether all were confirmed."""
        unlogged = list(self._unlogged)
        if not unlogged:
            return True
        await asyncio.wait(unlogged)
        return not any(f.cancelled() or f.exception() is not None for f in unlogged)

    # -- groups with outputs on their way ----------------------------------------------------

    @contextmanager
    def carrying(self, group: str) -> Iterator[None]:
        """While effects of `group` are carried out outside the shard queue's order (their rows
        stamped, not handed to the log yet): the group is `busy`."""
        self._carrying[group] = self._carrying.get(group, 0) + 1
        try:
            yield
        finally:
            if self._carrying[group] == 1:
                del self._carrying[group]
            else:
                self._carrying[group] -= 1

    def busy(self, group: str) -> bool:
        """Whether a group's outputs are not all out: a flush is due, or effects are being
        carried out."""
        return (
            group in self._flush_handles or group in self._pending_origin or group in self._carrying
        )

    def forget(self, group: str) -> None:
        """Drop a group's pending flush (its state went: a rebuild schedules it again)."""
        handle = self._flush_handles.pop(group, None)
        if handle is not None:
            handle.cancel()
        self._pending_origin.pop(group, None)

    # -- the rate limit's trailing edge (GroupState.flush) -----------------------------------

    def coalesced(self, group: str, origin: float) -> None:
        """A decision the rate limit holds back: the pending flush carries it (the oldest's
        receipt time measures end-to-end latency)."""
        self._pending_origin.setdefault(group, origin)

    def schedule_flush(self, state: GroupState, at: float) -> None:
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
        group = state.config.group
        origin = self._pending_origin.pop(group, None)
        try:
            await self._apply(state, state.flush(now()), origin)
        except Exception:
            # The bus is reconnecting: keep the change pending and try again shortly.
            log.exception("rate-limited flush of group %s failed; retrying", group)
            state.flush_failed()
            if origin is not None:
                self._pending_origin.setdefault(group, origin)
            self.schedule_flush(state, now() + FLUSH_RETRY_SECONDS)

    def _start_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    # -- shutdown ----------------------------------------------------------------------------

    def stop(self) -> None:
        """No more flushes: their timers and running tasks are cancelled."""
        for handle in self._flush_handles.values():
            handle.cancel()
        for task in self._flushes:
            task.cancel()

    async def close(self) -> None:
        for batcher in self._batchers.values():
            try:  # frames not sent by then are resent: their inputs were never acknowledged
                await asyncio.wait_for(batcher.close(), 5.0)
            except TimeoutError:
                log.warning("frames to a gateway were still unconfirmed at shutdown")
