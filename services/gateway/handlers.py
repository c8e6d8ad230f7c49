"""The gateway's connections and its bus handler: which sockets are here, and fan-out to them.

`Hub` knows every open participant connection on this gateway and forwards each message from
the gateway's queue (decisions addresses it directly, see `services.common.bus`) to the
connections it is for. A frame for a connection whose socket takes it is written at once; when
the socket is behind (its transport paused), the frame and the ones after it wait in the
connection's outbox, drained by its own writer task, so one slow browser never holds up the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from starlette.websockets import WebSocket, WebSocketState

from services.common.bus import decode_message
from services.common.directory import ParticipantInfo
from services.common.errors import CloseCode
from services.common.lobby import GROUP_FORMED, LOBBY
from services.common.logs import context
from services.common.messages import (
    Channel,
    Envelope,
    GroupFormed,
    Hello,
    MessageType,
    Resync,
    is_lobby,
    new_id,
    now,
    server_frame,
)
from services.gateway.fastpath import FastSocket, fast_socket, text_frame
from services.gateway.mailbox import Mailbox
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Suspended:
    """A socket write that could not finish at once: the coroutine and what it waits for."""

    write: Coroutine[Any, Any, None]
    blocker: Any  # the future it yielded (None: it only gave way to the loop)
    origin: float | None


async def _finish(suspended: _Suspended) -> None:
    """Run a write that suspended outside any task to its end, as a task would have.

    The same steps as `asyncio.Task`'s: wait until the future the coroutine yielded is done,
    then resume the coroutine (which reads that future's result or exception itself), until
    it returns. Cancelled meanwhile, the write is closed (its `finally` clauses run).
    """
    write, blocker = suspended.write, suspended.blocker
    while True:
        try:
            if blocker is None:
                await asyncio.sleep(0)
            else:
                blocker._asyncio_future_blocking = False
                await asyncio.wait([blocker])
        except BaseException:
            write.close()
            raise
        try:
            blocker = write.send(None)
        except StopIteration:
            return


class Connection:
    def __init__(self, websocket: WebSocket, info: ParticipantInfo, outbox_limit: int) -> None:
        loop = asyncio.get_running_loop()
        self.id = new_id()
        self.websocket = websocket
        # Frames written straight to the transport, when the server offers it (see
        # services/gateway/fastpath.py); None: everything goes through ASGI.
        self.socket: FastSocket | None = fast_socket(getattr(websocket, "scope", None))
        self.info = info
        # Frames waiting for the socket, each with the time its cause reached a gateway
        # (`Envelope.origin`), if any; a write that suspended comes first.
        self.outbox: Mailbox[tuple[str | bytes, float | None] | _Suspended | None] = Mailbox(
            outbox_limit
        )
        self._writing = False  # the writer task holds a frame: later ones queue behind it
        self._broken = False  # a write failed: the browser is gone (the reader notices)
        # Observes delivery latency (set by the `Hub`): receipt of the cause → socket write.
        self.on_delivered: Callable[[float], None] | None = None
        # One-shot signals as futures, not asyncio.Events (an Event allocates a deque: ~0.8 KiB
        # per connection each; see services/gateway/mailbox.py).
        self.hello: asyncio.Future[None] = loop.create_future()  # done once hello was sent
        self.last_seq = 0
        self.replaced = False
        self.closing = False
        # Done on `close`: the task serving the connection then stops its reader, which may wait
        # on a socket that sends nothing (and the writer on one that reads nothing).
        self.close_requested: asyncio.Future[None] = loop.create_future()
        self._close: tuple[int, str] = (1000, "")

    @property
    def participant(self) -> str:
        return self.info.participant

    @property
    def group(self) -> str:
        return self.info.group

    def send(
        self, frame: str | bytes, origin: float | None = None, wire: bytes | None = None
    ) -> bool:
        """Write a frame (its JSON text, UTF-8 bytes on the hot path) to this browser, or queue
        it behind earlier ones; False if the browser is too far behind. `wire`: the same frame
        as `text_frame` built it, if the caller has it (one per broadcast, for every member).

        With nothing queued, the frame is written right away, in the caller's step: a write
        that does not have to wait (the usual case: the transport takes it) costs no task
        switch, and on the fast path no coroutine either. One that has to wait (the transport
        is paused) goes through ASGI to the outbox's head and the writer task finishes it,
        then what queued behind it.
        """
        if self.closing or self._broken:
            return True
        if self._writing or self.outbox.qsize():
            return self.outbox.put_nowait((frame, origin))
        socket = self.socket
        if socket is not None:
            if wire is None:
                wire = text_frame(frame if isinstance(frame, bytes) else frame.encode())
            if socket.write(wire):
                self._delivered(origin)
                return True
            # Paused, closing or gone: ASGI knows how to wait, or to fail, as it always did.
        write = self.websocket.send_text(frame if isinstance(frame, str) else frame.decode())
        try:
            blocker = write.send(None)
        except StopIteration:
            self._delivered(origin)
            return True
        except Exception:
            self._broken = True  # the reader notices the disconnect and cleans up
            return True
        # First in the (empty) outbox: later frames queue behind it, and the writer takes it.
        return self.outbox.put_nowait(_Suspended(write, blocker, origin))

    def _delivered(self, origin: float | None) -> None:
        if origin is not None and self.on_delivered is not None:
            self.on_delivered(now() - origin)

    def close(self, code: int, reason: str = "") -> None:
        """Ask the writer task to close the socket after the frames already queued."""
        if self.closing:
            return
        self.closing = True
        if not self.close_requested.done():
            self.close_requested.set_result(None)
        self._close = (code, reason)
        if not self.outbox.put_nowait(None):
            # A slow client: drop one frame to make room to close. The newest: the oldest may
            # be a write under way (`_Suspended`), which is closed if it is the one dropped.
            dropped = self.outbox.drop_newest()
            if isinstance(dropped, _Suspended):
                dropped.write.close()
            self.outbox.put_nowait(None)

    async def write_loop(self) -> None:
        """Send queued frames in order; ends when closed or the browser went away."""
        ws = self.websocket
        while True:
            self._writing = False
            item = await self.outbox.get()
            self._writing = True
            if item is None:
                code, reason = self._close
                if ws.application_state == WebSocketState.CONNECTED and not self._broken:
                    with contextlib.suppress(RuntimeError):
                        await ws.close(code=code, reason=reason)
                return
            try:
                if isinstance(item, _Suspended):
                    origin = item.origin
                    await _finish(item)
                else:
                    frame, origin = item
                    await ws.send_text(frame if isinstance(frame, str) else frame.decode())
            except Exception:
                self._broken = True
                return  # the reader notices the disconnect and cleans up
            self._delivered(origin)


class Hub:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self.connections: dict[str, Connection] = {}
        self._members_here: dict[str, set[str]] = defaultdict(set)
        # Announce connections again (set by the composition root); see `Resync`. The argument
        # is the shards whose groups to announce (a worker took them over), None for all.
        self.on_resync: Callable[[list[int] | None], Coroutine[Any, Any, None]] | None = None
        # Announce a connection in the group the lobby just gave it (set by the composition
        # root, like `on_resync`): its presence there brings the group's `hello`.
        self.on_regroup: Callable[[Connection], Coroutine[Any, Any, None]] | None = None
        # Tells the seat cache (`Directory.regrouped`) where a seat of the lobby went.
        self.on_grouped: Callable[[str, str, int], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Computed when Prometheus scrapes, not on every frame.
        metrics.outbox_frames.set_function(
            lambda: sum(c.outbox.qsize() for c in self.connections.values())
        )
        metrics.outbox_frames_max.set_function(
            lambda: max((c.outbox.qsize() for c in self.connections.values()), default=0)
        )

    # -- connections -------------------------------------------------------------------------

    def add(self, connection: Connection) -> None:
        """Register a connection, replacing (4409) an older one of the same participant."""
        older = self.connections.get(connection.participant)
        if older is not None:
            older.replaced = True
            older.close(CloseCode.REPLACED, "replaced by a newer connection")
            self._metrics.replacements.inc()
        connection.on_delivered = self._metrics.delivery_seconds.observe
        self.connections[connection.participant] = connection
        self._metrics.connections.set(len(self.connections))
        self._members_here[connection.group].add(connection.participant)
        self._metrics.groups.set(len(self._members_here))

    def remove(self, connection: Connection) -> None:
        if self.connections.get(connection.participant) is not connection:
            return  # replaced: the newer connection stays registered
        del self.connections[connection.participant]
        self._metrics.connections.set(len(self.connections))
        members = self._members_here[connection.group]
        members.discard(connection.participant)
        if not members:
            del self._members_here[connection.group]
        self._metrics.groups.set(len(self._members_here))

    # -- from the bus ------------------------------------------------------------------------

    async def consume(self, queue: AbstractQueue, *, ack_every: int = 1) -> None:
        """Hand every message of the gateway's queue to `on_message`, which never raises: the
        loop ends only with the queue (the app's readiness then says so).

        Messages are acknowledged once handed to the sockets (their outboxes are bounded), so
        the channel's prefetch bounds what the broker sends ahead (before, with automatic acks
        and no prefetch, it sent the gateway whatever the queue held). One ack (`multiple`)
        every `ack_every` messages stands for all of them: give it half the prefetch, and the
        broker never runs out of credit while an ack is on its way. At 200 decisions/s that
        was one ack per broadcast message (~1 per decision) for the gateway to write and for
        RabbitMQ to apply, for nothing: the queue is exclusive, so what is unacknowledged when
        the connection drops goes with it either way, and the last few messages of a quiet
        spell wait for their ack without holding anything up (fewer than the prefetch). The
        ack is written without waiting for the socket's drain: while RabbitMQ blocks the
        connection it does not read it, and the prefetch then stops further deliveries."""
        unacked = 0
        async with queue.iterator() as messages:
            async for message in messages:
                self.on_message(message)
                unacked += 1
                if unacked < ack_every:
                    continue
                unacked = 0
                try:
                    await message.channel.basic_ack(
                        message.delivery_tag or 0, multiple=True, wait=False
                    )
                except Exception as exc:
                    # Its channel closed (the connection dropped): the broker takes it back
                    # with the exclusive queue; nothing to do here.
                    log.warning("messages of the gateway queue could not be acked (%r)", exc)

    def on_message(self, message: AbstractIncomingMessage) -> None:
        """Forward a bus message's envelopes. One that cannot be handled (malformed, or its
        delivery raised) is logged, counted and dropped, and the next one handled as usual:
        before, one exception ended the gateway's only consumer for good, every later frame
        to every participant on it was lost, and /readyz stayed green."""
        try:
            envelopes = decode_message(message)
        except ValueError as exc:
            log.error("malformed message on the gateway queue dropped: %s", exc)
            self._metrics.bus_failures.inc()
            return
        for envelope in envelopes:
            try:
                self._handle(envelope)
            except Exception:
                log.exception(
                    "a %s message on the gateway queue could not be handled; dropped",
                    envelope.type,
                    extra=context(envelope.session, envelope.group),
                )
                self._metrics.bus_failures.inc()

    def _handle(self, envelope: Envelope) -> None:
        if envelope.type is MessageType.CONTROL:
            self._control(envelope)
        elif envelope.type is MessageType.BROADCAST:
            self._broadcast(envelope)
        elif envelope.type is MessageType.RESYNC and self.on_resync is not None:
            shards = Resync.of(envelope).shards
            task = asyncio.get_running_loop().create_task(self.on_resync(shards))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _control(self, envelope: Envelope) -> None:
        connection = self.connections.get(envelope.participant or "")
        if connection is None or connection.id != envelope.connection:
            return  # not (or no longer) here
        if envelope.channel == Channel.HELLO:
            # Passed on as sent: `Hello` names only what the gateway reads of it.
            sent = Hello.of(envelope).last_seq
            payload: dict[str, Any] = dict(envelope.payload or {})
            # PROTOCOL v2 "The ack holds through everything": no hello may say less than an
            # ack this connection already sent, and a resync's could. Its hello is decisions'
            # state where the presence that asked for it (`Participants.announce`) stands in
            # the group's order, while the connection's frames kept going into the shard
            # queue behind that presence and were acked as soon as the broker confirmed them,
            # before decisions got to the presence. So the hello says at least the highest seq
            # acked here. That claims more than decisions has applied yet, which is safe
            # because an ack guarantees it: the frame is in the group's queue ahead of every
            # later input, so decisions applies (or refuses) it before any of those, and its
            # own last_seq reaches that seq; the client drops it from its pending frames, as
            # the ack already let it. The hello's decisions stay the snapshot's; that frame's
            # broadcast follows it in the group's order. (The other way, holding frames back
            # from a resync until its hello arrives, would stall every member's acks while a
            # restarted worker works through the backlog of its downtime.)
            last_seq = max(connection.last_seq, sent)
            if last_seq != payload.get("last_seq"):
                payload = {**payload, "last_seq": last_seq}
            connection.last_seq = last_seq
            self._deliver(connection, server_frame(Channel.HELLO, payload, envelope.ts))
            if not connection.hello.done():
                connection.hello.set_result(None)
        elif envelope.channel == Channel.FINISHED:
            # A seat back after its end (PROTOCOL v2 "Online studies"): its `finished` again,
            # to this connection only, right after its hello.
            self._deliver(connection, server_frame(Channel.FINISHED, envelope.payload, envelope.ts))
        elif envelope.channel == Channel.REPLACED:
            self._metrics.replacements.inc()
            connection.replaced = True
            connection.close(CloseCode.REPLACED, "replaced by a newer connection")
        elif envelope.channel == LOBBY:
            self._deliver(connection, server_frame(LOBBY, envelope.payload, envelope.ts))
        elif envelope.channel == GROUP_FORMED:
            try:
                formed = GroupFormed.of(envelope)
            except ValueError:  # not a group_formed this gateway understands: nothing moves
                return
            self._regroup(connection, formed)

    def _regroup(self, connection: Connection, formed: GroupFormed) -> None:
        """The lobby formed this connection's group (PROTOCOL v2 "The lobby"): from now on
        the connection belongs to that group (its frames, its presence, its broadcasts), and
        it says so to the group, whose `hello` the browser gets next."""
        group, members = formed.group, formed.members
        participant = connection.participant
        if participant not in members or not is_lobby(connection.group):
            return  # not this person's group, or moved already (a repeated notice)
        old = connection.group
        id_in_group = members.index(participant) + 1
        connection.info = connection.info.model_copy(
            update={"group": group, "id_in_group": id_in_group}
        )
        if self.on_grouped is not None:  # the seat's cached look-up follows it
            self.on_grouped(participant, group, id_in_group)
        if self.connections.get(participant) is connection:
            waiting = self._members_here[old]
            waiting.discard(participant)
            if not waiting:
                del self._members_here[old]
            self._members_here[group].add(participant)
            self._metrics.groups.set(len(self._members_here))
        if self.on_regroup is not None:
            task = asyncio.get_running_loop().create_task(self.on_regroup(connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _broadcast(self, envelope: Envelope) -> None:
        self._metrics.broadcasts.inc()
        frame: bytes | None = None
        wire: bytes | None = None
        if envelope.participant is not None:
            connection = self.connections.get(envelope.participant)
            if connection is not None:
                frame = server_frame(envelope.channel or "", envelope.payload, envelope.ts)
                self._deliver(connection, frame, envelope.origin)
            return
        for participant in self._members_here.get(envelope.group, ()):
            connection = self.connections.get(participant)
            if connection is None:
                continue
            if frame is None:  # encode once per broadcast, not once per member
                frame = server_frame(envelope.channel or "", envelope.payload, envelope.ts)
            if wire is None and connection.socket is not None:  # and frame it once
                wire = text_frame(frame)
            try:
                self._deliver(connection, frame, envelope.origin, wire)
            except Exception:
                # This member missed a frame: it reconnects and resynchronises from hello.
                # The others still get theirs.
                log.exception(
                    "delivery to a connection failed; closing it",
                    extra=context(envelope.session, envelope.group),
                )
                self._metrics.bus_failures.inc()
                connection.close(CloseCode.INTERNAL_ERROR, "internal error; reconnect")

    def _deliver(
        self,
        connection: Connection,
        frame: bytes,
        origin: float | None = None,
        wire: bytes | None = None,
    ) -> None:
        if connection.send(frame, origin, wire):
            self._metrics.frames_out.inc()
        else:
            info = connection.info
            log.warning(
                "participant %s is too far behind; disconnecting",
                connection.participant,
                extra=context(info.session, info.group, info.participant),
            )
            self._metrics.slow_clients.inc()
            # The browser reconnects and resynchronises from hello.
            connection.close(CloseCode.TRY_AGAIN_LATER, "too far behind; reconnect")
