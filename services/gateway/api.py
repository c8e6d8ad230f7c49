"""The participants' side of the gateway: `GET /ws/{key}` (PROTOCOL.md) and the page + client.

Per connection: the browser's `Origin` (CANOPY_ALLOWED_ORIGINS; a foreign one gets HTTP 403
before the upgrade), then the seat key (PROTOCOL v2: its tag checked first, then looked up;
unknown, or a participant's public code where the key belongs: close 4403). From then on the
connection is the participant's, named by their public code; the key is never logged. Per
frame: JSON → shape → channel →
flood limit → duplicate check → publish with confirm → `ack`. A rejected frame gets an `error`
and the connection stays open; nothing is acknowledged before the broker confirmed it, so an
acknowledged frame is never lost. The participant and group of every frame are the
connection's (from the key in the URL), never the frame's. Frames and presence go to their
group's shard queue through one `Batcher` per shard (group commit, see `services.common.bus`).

Every frame to the browser goes through its bounded outbox: one that overflows (a browser that
reads too slowly, or floods without reading its answers) closes the connection with 1013, and
the gateway stops reading it at once; the closing socket has `close_grace` seconds to take its
last frames and the close frame before the gateway lets go of it.

Every frame from the browser waits in its connection's inbox, bounded in bytes
(`inbox_bytes`), until it is published: while the inbox is full the gateway does not read the
socket (the frames wait in it, then in the browser). While RabbitMQ blocks the gateway (a
memory or disk alarm) nothing is confirmed, so every inbox soon fills and stays full, and a
new socket is closed at once with 1013 (docs/reliability.md, "RabbitMQ blocks publishers").
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED

import httpx
from fastapi import APIRouter, WebSocket
from fastapi.responses import PlainTextResponse
from starlette.websockets import WebSocketDisconnect

from services.common.bus import INPUTS, Batcher, Bus, shard_of
from services.common.directory import Directory, NotFound
from services.common.errors import CloseCode, ErrorCode, ProtocolError
from services.common.experiments import Registry
from services.common.logs import context
from services.common.messages import (
    Channel,
    Envelope,
    InboundFrame,
    MessageType,
    PresenceChanged,
    is_lobby,
    server_frame,
)
from services.common.seats import well_formed
from services.gateway.domain import MAX_SEQ_JUMP, SeatLimits, TokenBucket, parse_frame
from services.gateway.fastpath import FastSocket
from services.gateway.handlers import Connection, Hub
from services.gateway.join import join_router
from services.gateway.mailbox import Inbox
from services.gateway.metrics import UNPARSED, GatewayMetrics
from services.gateway.pages import page_router
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# What a parsed frame costs in an inbox beyond its text (the model, its fields, the tuple):
# about 600 bytes for a small decision, measured with tracemalloc.
INBOX_FRAME_COST = 512


class Participants:
    """Serves one participant connection from accept to close."""

    def __init__(
        self,
        settings: GatewaySettings,
        bus: Bus,
        directory: Directory,
        hub: Hub,
        metrics: GatewayMetrics,
        *,
        gateway: str,
        experiments: Registry | None = None,
    ) -> None:
        """`experiments`: the gateway's registry, whose experiments' channels it accepts and
        whose pages it serves (the built-ins alone when not given)."""
        self.experiments = Registry.builtin() if experiments is None else experiments
        self._settings = settings
        self._bus = bus
        self._directory = directory
        self._hub = hub
        self._metrics = metrics
        self._gateway = gateway  # this gateway's queue, where decisions sends our groups' frames
        self._origins = settings.origin_policy()
        self._seat_secret = settings.seat_key_secret()
        self._limits = SeatLimits(
            settings.max_frames_per_second,
            2 * settings.max_frames_per_second,
            connections_per_window=settings.max_connections_per_minute,
        )
        self._inputs = [
            Batcher(
                bus,
                INPUTS,
                f"shard.{index}.batch",
                mandatory=True,
                reliable=False,  # a failed publish closes the connection; the browser resends
                max_in_flight=settings.input_batches_in_flight,
                patience=settings.input_batch_patience,
                on_batch=metrics.batch_items.observe,
            )
            for index in range(settings.shards)
        ]

    async def close(self) -> None:
        for batcher in self._inputs:
            await batcher.close()

    async def _publish_input(self, envelope: Envelope) -> None:
        await self._inputs[shard_of(envelope.group, self._settings.shards)].add(envelope)

    async def serve(self, websocket: WebSocket, key: str) -> None:
        if not self._origins.allows(websocket.headers.get("origin")):
            # A page of another site using a participant's link: refused before the upgrade
            # (HTTP 403) and before any look-up, so it cannot even learn whether the key exists.
            self._metrics.connects.labels("foreign_origin").inc()
            await websocket.close(code=CloseCode.POLICY_VIOLATION)
            return
        if not self._bus.is_connected:
            # The broker is away (restarting): nothing could be acknowledged. Told to come back
            # instead of accepted and dropped in a loop; /readyz says the same meanwhile.
            self._metrics.connects.labels("broker_unavailable").inc()
            await websocket.accept()
            await websocket.close(code=CloseCode.TRY_AGAIN_LATER, reason="try again shortly")
            return
        if self._bus.blocked:
            # A memory or disk alarm: nothing would be confirmed until it clears, and the
            # socket's presence and frames would only wait here. Come back later (/readyz too).
            self._metrics.connects.labels("broker_blocked").inc()
            await websocket.accept()
            await websocket.close(code=CloseCode.TRY_AGAIN_LATER, reason="try again later")
            return
        try:
            if not well_formed(key, self._seat_secret):
                raise NotFound("not a seat key")  # a code, a guess: no look-up at all
            info = await self._directory.seat(key)
        except NotFound:
            self._metrics.connects.labels("unknown_participant").inc()
            # Accept, then close with 4403: a browser sees the close code (an HTTP 403 before
            # the upgrade reaches page scripts only as an anonymous failure, close code 1006).
            await websocket.accept()
            await websocket.close(code=CloseCode.UNKNOWN_PARTICIPANT, reason="unknown participant")
            return
        except httpx.HTTPError:
            self._metrics.connects.labels("store_unreachable").inc()
            await websocket.accept()  # so the browser sees 1013 and retries
            await websocket.close(code=CloseCode.TRY_AGAIN_LATER, reason="try again shortly")
            return
        if not self._limits.admit(info.participant, time.monotonic()):
            # A reconnect storm (a script, a page reloading in a loop): refused before it could
            # replace the seat's connection or cost the group a presence change (PROTOCOL v2).
            self._metrics.connects.labels("too_many_connections").inc()
            wait = self._limits.retry_after(info.participant, time.monotonic())
            await websocket.accept()
            await websocket.close(
                code=CloseCode.TOO_MANY_CONNECTIONS,
                reason=f"too many connections; try again in {max(1, round(wait))} s",
            )
            return
        await websocket.accept()
        self._metrics.connects.labels("accepted").inc()
        log.info("participant connected", extra=context(info.session, info.group, info.participant))
        connection = Connection(websocket, info, self._settings.outbox_limit)
        writer = asyncio.create_task(connection.write_loop())
        try:
            self._hub.add(connection)
            await self._presence(connection, connected=True)
            await self._read_until_closed(connection)
        except WebSocketDisconnect:
            pass
        except Exception:
            # Typically the broker connection dropped mid-publish: unacknowledged frames are
            # resent by the browser after it reconnects, so closing loses nothing.
            log.exception("connection of %s failed", info.participant)
            connection.close(CloseCode.INTERNAL_ERROR, "server error; reconnect")
        finally:
            self._hub.remove(connection)
            self._metrics.disconnects.inc()  # with the connections gauge: one scrape sees both
            if not connection.replaced:
                try:
                    await self._presence(connection, connected=False)
                except Exception:
                    log.exception("could not publish the disconnect of %s", info.participant)
            connection.close(1000)
            await self._let_go(connection, writer)
            now_in = connection.info  # its group, if the lobby gave it one meanwhile
            log.info(
                "participant disconnected",
                extra=context(now_in.session, now_in.group, now_in.participant),
            )

    async def _read_until_closed(self, connection: Connection) -> None:
        """Read until the browser leaves or a close is requested (then stop reading at once)."""
        if connection.socket is not None:
            # The fast path reads in data_received: this task waits in `_read`, which a close
            # request ends (no reader task to cancel: one task less per connection).
            try:
                await self._read(connection)
            except Exception:
                if not connection.closing:
                    raise
                # Closed meanwhile: as for the reader task cancelled below, its failure (the
                # publisher's) is not reported.
            return
        reader = asyncio.create_task(self._read(connection))

        def stop_reading(_: object) -> None:
            reader.cancel()  # its own cleanup still publishes the frames it had read

        # A callback rather than a task waiting for the close: one task less per connection.
        connection.close_requested.add_done_callback(stop_reading)
        try:
            await asyncio.wait({reader})
        finally:
            connection.close_requested.remove_done_callback(stop_reading)
            if not reader.done():  # this task was cancelled (shutdown)
                reader.cancel()
                await asyncio.wait({reader})
        if not reader.cancelled():
            reader.result()

    async def _let_go(self, connection: Connection, writer: asyncio.Task[None]) -> None:
        """Give the writer `close_grace` seconds to send what is queued and the close frame."""
        done, _ = await asyncio.wait({writer}, timeout=self._settings.close_grace)
        if not done:
            log.info(
                "connection of %s did not take its last frames in %ss; dropped",
                connection.participant,
                self._settings.close_grace,
            )
            writer.cancel()
            await asyncio.wait({writer})
        if not writer.cancelled():
            writer.exception()  # the browser went away mid-send: nothing left to tell it

    def _reply(self, connection: Connection, frame: bytes) -> None:
        """Queue an answer (ack, error) for the browser; one too far behind is closed (1013)."""
        if not connection.send(frame):
            log.warning("participant %s is too far behind; disconnecting", connection.participant)
            self._metrics.slow_clients.inc()
            connection.close(CloseCode.TRY_AGAIN_LATER, "too far behind; reconnect")

    async def announce(self, connection: Connection) -> None:
        """Say again that this connection is open (a decisions worker asked: `Resync`)."""
        await self._presence(connection, connected=True)

    async def _presence(self, connection: Connection, *, connected: bool) -> None:
        info = connection.info
        envelope = Envelope[PresenceChanged](
            type=MessageType.PRESENCE_CHANGED,
            session=info.session,
            group=info.group,
            participant=info.participant,
            connection=connection.id,
            gateway=self._gateway,
            payload=PresenceChanged(connected=connected),
        )
        await self._publish_input(envelope)

    async def _read(self, connection: Connection) -> None:
        """Validate frames as they arrive; hand accepted ones to the connection's publisher.

        Reading never waits for the broker, so the flood limit sees the real arrival rate, and
        the publisher keeps one participant's frames in seq order on the bus.
        """
        # One bucket per participant, kept across reconnects (PROTOCOL v2); every frame takes
        # a token, valid or not, so a stream of bad frames floods no more than good ones.
        bucket = self._limits.bucket(connection.participant, time.monotonic())
        channels = self.experiments.get(connection.info.experiment).channels
        websocket = connection.websocket
        inbox: Inbox[InboundFrame | None] = Inbox(self._settings.inbox_bytes)
        publisher = asyncio.create_task(self._publish_loop(connection, inbox))
        try:
            if connection.socket is not None:
                reader = _Reader(self, connection, bucket, channels, inbox, publisher)
                await reader.run(connection.socket)
                return
            while not connection.closing and not publisher.done():
                if inbox.full:
                    # The broker has not taken this browser's frames yet: stop reading it
                    # until it does (or the publisher fails), rather than buffer more.
                    self._metrics.inbox_full.inc()
                    await asyncio.wait({inbox.room(), publisher}, return_when=FIRST_COMPLETED)
                    continue
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                self._take(connection, bucket, channels, inbox, message.get("text"))
        finally:
            # Frames already read are still published (and acknowledged if the socket is open).
            inbox.put_nowait(None, 0)
            await publisher

    def _take(
        self,
        connection: Connection,
        bucket: TokenBucket,
        channels: frozenset[str],
        inbox: Inbox[InboundFrame | None],
        text: str | None,
    ) -> None:
        """One frame read from the browser (None: a binary one): the flood limit, its shape,
        then the inbox; a refused frame gets its `error`."""
        settings = self._settings
        now = time.monotonic()
        allowed = bucket.take(now)
        try:
            if text is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary frames are not accepted")
            frame = parse_frame(text, channels)
            if not allowed:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_MESSAGES,
                    f"more than {settings.max_frames_per_second:g} frames/s",
                    frame.seq,
                )
            inbox.put_nowait(frame, len(text) + INBOX_FRAME_COST)
        except ProtocolError as error:
            # Only a flood refusal comes after the frame (and its channel) was parsed.
            known = error.code == ErrorCode.TOO_MANY_MESSAGES
            channel = frame.channel if known else UNPARSED
            if not allowed and not known:
                # Past the limit a bad frame is refused as a flood like any other (its answers
                # count against the outbox: a flood that does not read them is closed with
                # 1013).
                error = ProtocolError(
                    ErrorCode.TOO_MANY_MESSAGES,
                    f"more than {settings.max_frames_per_second:g} frames/s",
                    error.seq,
                )
            self._metrics.frame_outcome(channel, error.code).inc()
            payload = {"code": error.code, "message": error.message, "seq": error.seq}
            self._reply(connection, server_frame(Channel.ERROR, payload))

    async def _publish_loop(
        self, connection: Connection, inbox: Inbox[InboundFrame | None]
    ) -> None:
        while (frame := await inbox.get()) is not None:
            await self._accept(connection, frame)

    async def _accept(self, connection: Connection, frame: InboundFrame) -> None:
        if not connection.hello.done():
            # The hello carries last_seq; without it (decisions slow) downstream dedup still holds.
            try:
                await asyncio.wait_for(
                    asyncio.shield(connection.hello), self._settings.hello_timeout
                )
            except TimeoutError:
                log.warning(
                    "no hello for %s after %ss",
                    connection.participant,
                    self._settings.hello_timeout,
                )
        seq = frame.seq
        if is_lobby(connection.group) and seq > connection.last_seq:
            # PROTOCOL v2 "The lobby": no group yet, so nothing to decide. Refused here, not
            # acknowledged (an acknowledged frame would have to reach a group's log).
            self._metrics.frame_outcome(frame.channel, ErrorCode.PERIOD_NOT_RUNNING).inc()
            message = "you are in the lobby: your group has not formed yet"
            payload = {"code": ErrorCode.PERIOD_NOT_RUNNING, "message": message, "seq": seq}
            self._reply(connection, server_frame(Channel.ERROR, payload))
            return
        if seq <= connection.last_seq:
            self._metrics.frame_outcome(frame.channel, "duplicate").inc()
            self._metrics.acks.inc()
            self._reply(connection, server_frame(Channel.ACK, {"seq": seq}))
            return
        if seq > connection.last_seq + MAX_SEQ_JUMP:
            # PROTOCOL v2: a client cannot push its own counter out of reach (a seq of 2^53
            # would make every later frame a "duplicate" in a browser's arithmetic).
            self._metrics.frame_outcome(frame.channel, ErrorCode.BAD_MESSAGE).inc()
            message = (
                f"seq {seq} is more than {MAX_SEQ_JUMP:,} above last_seq {connection.last_seq}"
            )
            payload = {"code": ErrorCode.BAD_MESSAGE, "message": message, "seq": seq}
            self._reply(connection, server_frame(Channel.ERROR, payload))
            return
        info = connection.info
        envelope = Envelope(
            type=MessageType.FRAME_ACCEPTED,
            session=info.session,
            group=info.group,
            participant=info.participant,
            seq=seq,
            channel=frame.channel,
            connection=connection.id,
            gateway=self._gateway,
            payload=frame.payload,
        )
        started = time.perf_counter()
        await self._publish_input(envelope)
        self._metrics.confirm_seconds.observe(time.perf_counter() - started)
        self._metrics.frame_outcome(frame.channel, "accepted").inc()
        self._metrics.acks.inc()
        connection.last_seq = seq
        self._reply(connection, server_frame(Channel.ACK, {"seq": seq}))


class _Reader:
    """`Participants._read` on the fast path (services/gateway/fastpath.py): the socket hands
    each frame to this reader as it is read, in `data_received`, with no ASGI message and no
    task switch; the connection's task only waits for the socket to end, the publisher to
    fail, or a close request. (An object with slots rather than closures: a few hundred bytes
    less per connection.)"""

    __slots__ = (
        "_bucket",
        "_channels",
        "_connection",
        "_ended",
        "_inbox",
        "_participants",
        "_publisher",
        "_socket",
    )

    def __init__(
        self,
        participants: Participants,
        connection: Connection,
        bucket: TokenBucket,
        channels: frozenset[str],
        inbox: Inbox[InboundFrame | None],
        publisher: asyncio.Task[None],
    ) -> None:
        self._participants = participants
        self._connection = connection
        self._bucket = bucket
        self._channels = channels
        self._inbox = inbox
        self._publisher = publisher
        self._socket: FastSocket | None = None
        self._ended: asyncio.Future[None] | None = None

    async def run(self, socket: FastSocket) -> None:
        """Take frames until the socket ends (raising what taking one raised), the publisher
        is done, or a close is requested."""
        self._socket = socket
        ended = self._ended = socket.read(self)
        self._publisher.add_done_callback(self._stop)
        self._connection.close_requested.add_done_callback(self._stop)
        try:
            await ended
        finally:
            socket.stop_reading()
            self._publisher.remove_done_callback(self._stop)
            self._connection.close_requested.remove_done_callback(self._stop)

    def __call__(self, text: str | None) -> bool:
        connection, inbox = self._connection, self._inbox
        if connection.closing or self._publisher.done():
            return False  # read no more; `run` ends
        self._participants._take(connection, self._bucket, self._channels, inbox, text)
        if not inbox.full:
            return True
        # The broker has not taken this browser's frames yet: stop reading it until it does
        # (or the publisher fails), rather than buffer more.
        self._participants._metrics.inbox_full.inc()
        inbox.room().add_done_callback(self._resume)
        return False

    def _resume(self, _: object) -> None:
        if self._socket is not None:
            self._socket.resume_reading()

    def _stop(self, _: object) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)


SOCKET_PATH = "/ws/{key}"  # a participant's socket (PROTOCOL v2); also GatewayApp's short way


def participant_router(participants: Participants) -> APIRouter:
    router = APIRouter()

    @router.websocket(SOCKET_PATH)
    async def websocket_endpoint(websocket: WebSocket, key: str) -> None:
        await participants.serve(websocket, key)

    router.include_router(
        page_router(participants._directory, participants._seat_secret, participants.experiments)
    )
    router.include_router(join_router(participants._directory, participants._seat_secret))

    @router.get("/", response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return "Canopy gateway. Participants open /p/<key>; the WebSocket is /ws/<key>.\n"

    return router
