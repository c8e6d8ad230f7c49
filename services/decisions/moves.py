"""When a group's state leaves this worker, and what makes it safe to rebuild it from the log.

A group's state is held in memory and rebuilt from the group's log whenever it is needed
again (`group.rebuild`; its inputs redelivered are then recognised as applied and applied
exactly once). That is safe only if the log in MongoDB holds every row the state produced, and
a log barrier proves it (`wait_for_log`): once the store wrote the barrier, every record sent
to the log before it is in MongoDB. The state leaves in three ways, and comes back from the log
the same way for each:

- **Shard moves** (ARCHITECTURE "Crash-safe state"). A worker that takes shards over first
  waits for its log barrier, behind whatever the previous owner left in the log queue, then
  asks every gateway to announce its open connections again (`request_resync`): members get a
  fresh `hello` and broadcasts reach them (services.decisions.liveness says what happens to
  those nobody announces). A shard handed to another worker is forgotten (`forget_shard`).
- **Ended groups** (bounded memory). A group whose last period ended and whose members all
  left is evicted (`evict_ended`, `evict_after` seconds later, in one sweep for every such
  group) once the log holds all its rows: the log batches that could carry them were
  confirmed, then a log barrier passed. A later input for it (a late presence, a reconnect, a
  redelivery) rebuilds it, as after a restart, so a participant back after the end gets the
  final `hello`. A member still connected keeps the group in memory: a state rebuilt from the
  log could not tell an open socket from a gone one without asking the gateways again.
- **Failed outputs.** An input whose outputs failed goes back to its queue, but the state has
  applied it: handled again it would be a duplicate, and its rows would never reach the log.
  Its group's state is dropped (`drop`), and its rebuild first waits until the log holds every
  batch sent before (`before_rebuild`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Protocol

import httpx

from services.common.barrier import wait_for_barrier
from services.common.bus import GATEWAYS, LOG, LOG_KEY, shard_of
from services.common.group import GroupState
from services.common.lobby import LobbyState
from services.common.messages import Envelope, MessageType, Resync
from services.common.ports import GroupDirectory, Publisher
from services.decisions.metrics import DecisionsMetrics
from services.decisions.outputs import Outputs

log = logging.getLogger(__name__)


class Holder(Protocol):
    """What the worker holds, as moves see it (`DecisionsWorker`)."""

    groups: dict[str, GroupState]
    lobbies: dict[str, LobbyState]

    def held(self, group: str) -> GroupState | LobbyState | None:
        """The state held for a group or a lobby, if any."""

    def forget(self, group: str) -> None:
        """Drop a group's or a lobby's state and everything kept beside it."""


class Moves:
    """The log barrier, the resync request, and dropping groups: a shard handed over, the
    ended ones swept, one whose outputs failed."""

    def __init__(
        self,
        bus: Publisher,
        directory: GroupDirectory,
        metrics: DecisionsMetrics,
        outputs: Outputs,
        holder: Holder,
        *,
        evict_after: float,
    ) -> None:
        self._bus = bus
        self._directory = directory
        self._metrics = metrics
        self._outputs = outputs
        self._holder = holder
        self._evict_after = evict_after
        self._sweep: asyncio.TimerHandle | asyncio.Task[None] | None = None  # the next eviction
        self._sweeps: set[asyncio.Task[None]] = set()
        # Groups whose state was dropped because an input's outputs failed: their next
        # rebuild first waits until the log holds every batch sent before (`before_rebuild`).
        self._tainted: set[str] = set()

    # -- the log barrier ---------------------------------------------------------------------

    async def wait_for_log(self, *, poll: float = 0.02, resend_after: float = 10.0) -> float:
        """Wait until the store wrote everything sent to the log before now; seconds waited.

        A barrier goes through the log queue behind whatever a previous worker left there;
        the store records it after the batch holding it was written."""
        started = time.perf_counter()
        await self.log_barrier(poll=poll, resend_after=resend_after)
        return time.perf_counter() - started

    async def log_barrier(self, *, poll: float = 0.02, resend_after: float = 10.0) -> None:
        """Until the store wrote everything published to the event log before now."""
        await wait_for_barrier(
            partial(self._bus.publish_reliably, LOG, LOG_KEY),
            self._directory.barrier_passed,
            poll=poll,
            resend_after=resend_after,
            tolerate=(httpx.HTTPError,),
        )

    # -- shard moves -------------------------------------------------------------------------

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
        holder = self._holder
        gone = [group for group in holder.groups if shard_of(group, shards) == index]
        gone += [lobby for lobby in holder.lobbies if shard_of(lobby, shards) == index]
        for group in gone:
            holder.forget(group)
        self._metrics.groups.set(len(holder.groups))
        return len(gone)

    # -- failed outputs ----------------------------------------------------------------------

    def drop(self, group: str) -> None:
        """Drop a group's state after an input's outputs failed; rebuilt when it comes back."""
        self._holder.forget(group)
        self._tainted.add(group)
        self._metrics.groups.set(len(self._holder.groups))

    async def before_rebuild(self, group: str) -> None:
        """Before rebuilding a group whose dropped state sent rows that may still be on their
        way to the store: until the log holds them."""
        if group in self._tainted:
            await self._outputs.all_logged()
            await self.log_barrier()
            self._tainted.discard(group)

    # -- evicting ended groups ---------------------------------------------------------------

    def evictable(self, state: GroupState | LobbyState) -> bool:
        """Its last period ended, nobody is connected, and no rate-limited flush is due; a
        lobby: every group is formed and nobody waits in it. A later input for either (someone
        back on an old link) rebuilds it from the log."""
        group = state.config.group
        if isinstance(state, LobbyState):
            done = state.next_group() is None and not state.waiting and not state.overdue
            return done and not self._outputs.busy(group)
        return (
            state.state == "ended"
            and state.period == state.config.num_periods
            and not state.connections
            and not state.flush_pending
            and not self._outputs.busy(group)
        )

    def consider_eviction(self, state: GroupState | LobbyState) -> None:
        """Sweep `evict_after` seconds from now if the group may go (one sweep at a time)."""
        if self._sweep is None and self.evictable(state):
            self._sweep = asyncio.get_running_loop().call_later(
                self._evict_after, self._start_sweep
            )

    def _start_sweep(self) -> None:
        task = asyncio.get_running_loop().create_task(self.evict_ended())
        self._sweep = task
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def evict_ended(self) -> None:
        """Evict every evictable group whose rows are all in MongoDB.

        A group is evicted only if nothing was logged for it since the sweep began (its clock
        moves with every row): those rows might not be written yet, and a rebuild would miss
        them."""
        try:
            await self._evict_logged()
        finally:
            self._sweep = None
        for state in self._held_states():  # one that ended meanwhile: another sweep
            if self.evictable(state):
                self.consider_eviction(state)
                break

    def _held_states(self) -> list[GroupState | LobbyState]:
        return [*self._holder.groups.values(), *self._holder.lobbies.values()]

    async def _evict_logged(self) -> None:
        candidates = [(s, s.clock) for s in self._held_states() if self.evictable(s)]
        if not candidates:
            return
        if not await self._outputs.all_logged():
            return  # a batch failed: its inputs come again; try on the next sweep
        await self.log_barrier()
        holder = self._holder
        evicted = 0
        for state, clock in candidates:
            group = state.config.group
            unchanged = holder.held(group) is state and state.clock == clock
            if unchanged and self.evictable(state):
                holder.forget(group)
                evicted += 1
        self._metrics.groups.set(len(holder.groups))
        if evicted:
            self._metrics.groups_evicted.inc(evicted)
            log.info("%d ended groups evicted; %d groups held", evicted, len(holder.groups))

    def stop(self) -> None:
        """No more sweeps: the next one's timer, or the one running, is cancelled."""
        if isinstance(self._sweep, asyncio.TimerHandle):
            self._sweep.cancel()
        for task in self._sweeps:
            task.cancel()
