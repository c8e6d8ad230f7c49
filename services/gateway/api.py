"""The participants' side of the gateway: `GET /ws/{code}` (PROTOCOL.md) and the page + client.

Per frame: flood limit → JSON → shape → channel → duplicate check → publish with confirm →
`ack`. A rejected frame gets an `error` and the connection stays open; nothing is acknowledged
before the broker confirmed it, so an acknowledged frame is never lost. Frames and presence go
to their group's shard queue through one `Batcher` per shard (group commit, see
`services.common.bus`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.resources import files

import httpx
from fastapi import APIRouter, WebSocket
from fastapi.responses import HTMLResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect

from services.common import experiments
from services.common.bus import INPUTS, Batcher, Bus, shard_of
from services.common.directory import Directory, NotFound
from services.common.errors import CloseCode, ErrorCode, ProtocolError
from services.common.messages import (
    Channel,
    Envelope,
    InboundFrame,
    MessageType,
    server_frame,
)
from services.gateway.domain import TokenBucket, parse_frame
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

TRY_AGAIN_LATER = 1013
INTERNAL_ERROR = 1011


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
    ) -> None:
        self._settings = settings
        self._directory = directory
        self._hub = hub
        self._metrics = metrics
        self._gateway = gateway  # this gateway's queue, where decisions sends our groups' frames
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

    async def serve(self, websocket: WebSocket, code: str) -> None:
        try:
            info = await self._directory.participant(code)
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
            await websocket.close(code=TRY_AGAIN_LATER, reason="try again shortly")
            return
        await websocket.accept()
        self._metrics.connects.labels("accepted").inc()
        connection = Connection(websocket, info, self._settings.outbox_limit)
        writer = asyncio.create_task(connection.write_loop())
        try:
            self._hub.add(connection)
            await self._presence(connection, connected=True)
            await self._read(connection)
        except WebSocketDisconnect:
            pass
        except Exception:
            # Typically the broker connection dropped mid-publish: unacknowledged frames are
            # resent by the browser after it reconnects, so closing loses nothing.
            log.exception("connection of %s failed", code)
            connection.close(INTERNAL_ERROR, "server error; reconnect")
        finally:
            self._hub.remove(connection)
            if not connection.replaced:
                try:
                    await self._presence(connection, connected=False)
                except Exception:
                    log.exception("could not publish the disconnect of %s", code)
            connection.close(1000)
            await writer

    async def _presence(self, connection: Connection, *, connected: bool) -> None:
        info = connection.info
        envelope = Envelope(
            type=MessageType.PRESENCE_CHANGED,
            session=info.session,
            group=info.group,
            participant=info.participant,
            connection=connection.id,
            gateway=self._gateway,
            payload={"connected": connected},
        )
        await self._publish_input(envelope)

    async def _read(self, connection: Connection) -> None:
        """Validate frames as they arrive; hand accepted ones to the connection's publisher.

        Reading never waits for the broker, so the flood limit sees the real arrival rate, and
        the publisher keeps one participant's frames in seq order on the bus.
        """
        settings = self._settings
        bucket = TokenBucket(settings.max_frames_per_second, 2 * settings.max_frames_per_second)
        channels = experiments.get(connection.info.experiment).channels
        websocket = connection.websocket
        inbox: asyncio.Queue[InboundFrame | None] = asyncio.Queue()
        publisher = asyncio.create_task(self._publish_loop(connection, inbox))
        try:
            while not connection.closing and not publisher.done():
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                try:
                    if text is None:
                        raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary frames are not accepted")
                    frame = parse_frame(text, channels)
                    if not bucket.take(time.monotonic()):
                        raise ProtocolError(
                            ErrorCode.TOO_MANY_MESSAGES,
                            f"more than {settings.max_frames_per_second:g} frames/s",
                            frame.seq,
                        )
                    inbox.put_nowait(frame)
                except ProtocolError as error:
                    self._metrics.frames.labels(error.code).inc()
                    payload = {"code": error.code, "message": error.message, "seq": error.seq}
                    connection.send(server_frame(Channel.ERROR, payload).decode())
        finally:
            # Frames already read are still published (and acknowledged if the socket is open).
            inbox.put_nowait(None)
            await publisher

    async def _publish_loop(
        self, connection: Connection, inbox: asyncio.Queue[InboundFrame | None]
    ) -> None:
        while (frame := await inbox.get()) is not None:
            await self._accept(connection, frame)

    async def _accept(self, connection: Connection, frame: InboundFrame) -> None:
        if not connection.hello.is_set():
            # The hello carries last_seq; without it (decisions slow) downstream dedup still holds.
            try:
                await asyncio.wait_for(connection.hello.wait(), self._settings.hello_timeout)
            except TimeoutError:
                log.warning(
                    "no hello for %s after %ss",
                    connection.participant,
                    self._settings.hello_timeout,
                )
        seq = frame.seq
        if seq <= connection.last_seq:
            self._metrics.frames.labels("duplicate").inc()
            connection.send(server_frame(Channel.ACK, {"seq": seq}).decode())
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
        self._metrics.frames.labels("accepted").inc()
        connection.last_seq = seq
        connection.send(server_frame(Channel.ACK, {"seq": seq}).decode())


def participant_router(participants: Participants) -> APIRouter:
    router = APIRouter()
    static = files("services.gateway").joinpath("static")

    @router.websocket("/ws/{code}")
    async def websocket_endpoint(websocket: WebSocket, code: str) -> None:
        await participants.serve(websocket, code)

    @router.get("/p/{code}", response_class=HTMLResponse, include_in_schema=False)
    async def participant_page(code: str) -> HTMLResponse:
        return HTMLResponse(static.joinpath("participant.html").read_text())

    @router.get("/", response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return "Canopy gateway. Participants open /p/<code>; the WebSocket is /ws/<code>.\n"

    return router
