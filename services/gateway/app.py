"""Composition root of the gateway: bus, store look-ups, the hub, the participants' routes.

Besides serving participants, a gateway sends a `GatewayAlive` heartbeat every
`HEARTBEAT_INTERVAL` seconds (decisions disconnects the members of a silent gateway) and
answers a `Resync` (a decisions worker restarted) by announcing every open connection again;
it announces them again as well once its own broker connection is back (`announce_again`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from services.common.bus import (
    HEARTBEAT_INTERVAL,
    LIVENESS,
    Bus,
    Topology,
    gateway_queue,
    running,
    shard_of,
)
from services.common.csp import PAGES_POLICY, ContentSecurityPolicy
from services.common.directory import Directory
from services.common.errors import CloseCode
from services.common.experiments import Registry
from services.common.health import VitalTasks, health_router
from services.common.messages import Envelope, MessageType
from services.common.serve import instance_name
from services.common.vendor import mount_vendor
from services.gateway.api import SOCKET_PATH, Participants, participant_router
from services.gateway.handlers import Connection, Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, with a short way in for participant sockets.

    A WebSocket to `/ws/{key}` goes straight to `Participants.serve`, the endpoint of the
    route that `participant_router` registers, without the middleware stack and FastAPI's
    per-route machinery in between. Each of those layers stays suspended for as long as the
    socket is open, and wraps every `send`: measured with tracemalloc, about 12 KiB of the
    39 KiB a connected participant cost, for nothing a participant socket uses (they handle
    HTTP errors and dependencies). The route stays registered, so routing checks and route
    listings see it; everything else (pages, /metrics, /readyz, lifespan) goes through FastAPI.
    """

    participants: Participants | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.participants is not None:
            key = participant_socket(scope["path"])
            if key is not None:
                scope["app"] = self
                await self.participants.serve(WebSocket(scope, receive, send), key)
                return
        await super().__call__(scope, receive, send)


_SOCKET = compile_path(SOCKET_PATH)[0]  # the route's own pattern, compiled as Starlette does


def participant_socket(path: str) -> str | None:
    """The seat key of a participant socket's path, None for any other path."""
    match = _SOCKET.match(path)
    return match["key"] if match else None


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    instance = instance_name(settings)
    bus = Bus(
        settings.amqp_url,
        Topology(settings.shards, settings.queue_type, service="gateway"),
        name=f"gateway {instance}",
        on_reconnect=lambda: reconnected(),
        on_unblocked=lambda: announce_again("RabbitMQ no longer blocks this gateway"),
    )
    directory = Directory(settings.store_url, settings.internal_bearer())
    hub = Hub(metrics)
    vital = VitalTasks()
    me = gateway_queue(instance)
    # The experiments whose channels and pages it serves: the built-ins now, the plug-ins at
    # start (lifespan, once logging is set up: loading them logs what it found).
    experiments = Registry.builtin()
    participants = Participants(
        settings, bus, directory, hub, metrics, gateway=me, experiments=experiments
    )

    async def resync(shards: list[int] | None, why: str | None = None) -> None:
        connections = [
            connection
            for connection in hub.connections.values()
            if shards is None or shard_of(connection.group, settings.shards) in shards
        ]
        log.info(
            "%s: announcing %d connections",
            why
            or "a decisions worker took over "
            + ("every shard" if shards is None else f"shards {shards}"),
            len(connections),
        )
        for connection in connections:
            try:
                await participants.announce(connection)
            except Exception:
                log.exception("could not announce %s again", connection.participant)

    hub.on_resync = resync
    announcing: set[asyncio.Task[None]] = set()

    def announce_again(why: str) -> None:
        # While RabbitMQ blocked this gateway its heartbeats could not be published either, so
        # decisions may have taken it for dead and disconnected its members, whose sockets
        # stayed open here: announced again, they are connected again (for a worker that did
        # not, an announcement of a connection it knows is no change but a new `hello`).
        task = asyncio.get_running_loop().create_task(resync(None, why))
        announcing.add(task)
        task.add_done_callback(announcing.discard)

    def reconnected() -> None:
        # The robust connection calls this once every channel is restored, the gateway's queue
        # and its consumer included. While the connection was down that queue did not exist
        # (exclusive: it goes with its connection), and decisions sends to it without
        # `mandatory`, so whatever it sent meanwhile went nowhere: the `hello` of a socket
        # accepted just before (whose browser sends nothing until its hello: it would wait
        # for good), broadcasts, a `Resync`. And a gateway silent for longer than decisions'
        # liveness timeout had its members disconnected, their sockets still open here.
        # Announced again, every connection gets a new hello and is connected again.
        metrics.bus_reconnects.inc()
        announce_again("the connection to RabbitMQ was restored")

    async def regroup(connection: Connection) -> None:
        try:
            await participants.announce(connection)
        except Exception:
            # Its socket is closed instead: the browser reconnects to the seat, which the
            # store now gives its group.
            log.exception("could not announce %s in its new group", connection.participant)
            connection.close(CloseCode.INTERNAL_ERROR, "server error; reconnect")

    hub.on_regroup = regroup
    hub.on_grouped = directory.regrouped

    async def heartbeat() -> None:
        alive = Envelope(type=MessageType.GATEWAY_ALIVE, session="", group="", gateway=me)
        while True:
            try:
                await bus.publish(LIVENESS, "", alive, mandatory=False)
            except Exception as exc:  # the broker is away: readiness says so meanwhile
                log.warning("heartbeat not sent (%r)", exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        experiments.load_plugins()  # logs which experiments' channels and pages it serves
        await bus.connect()
        # Finite, with acks (Hub.consume): the broker sends at most this many messages ahead.
        channel = await bus.channel(prefetch=settings.gateway_prefetch)
        queue = await bus.declare_gateway_queue(channel, instance)
        tasks = [
            vital.watch(
                "the gateway queue's consumer",
                asyncio.create_task(
                    hub.consume(queue, ack_every=max(1, settings.gateway_prefetch // 2))
                ),
            ),
            vital.watch("the heartbeat", asyncio.create_task(heartbeat())),
        ]
        async with running(tasks):
            yield
        await participants.close()
        await directory.close()
        await bus.close()

    async def readiness() -> list[str]:
        stopped = vital.problems()  # a dead consumer: no broadcast reaches anyone here
        if not bus.is_connected:
            return [*stopped, "not connected to RabbitMQ"]
        problems = [*stopped]
        problems += [f"no consumer on {name}" for name in await bus.missing_consumers()]
        if not await directory.reachable():
            problems.append("store unreachable")
        return problems

    app = GatewayApp(title="Canopy gateway", lifespan=lifespan)
    app.add_middleware(ContentSecurityPolicy, policy=PAGES_POLICY)  # not on /ws (see __call__)
    app.participants = participants
    app.include_router(
        health_router(
            metrics.registry, readiness, metrics.ready, bus=bus, blocked=metrics.bus_blocked
        )
    )
    app.include_router(participant_router(participants))
    mount_vendor(app)
    static_dir = Path(str(files("services.gateway").joinpath("static")))
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    app.state.hub = hub
    app.state.experiments = experiments
    return app
