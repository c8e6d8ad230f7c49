"""Composition root of the store service: MongoDB, the event writer, the HTTP API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.staticfiles import StaticFiles

from services.common.bus import STORE_QUEUE, Bus, Topology, dead_letter_queue, running
from services.common.csp import CONSOLE_POLICY, ContentSecurityPolicy
from services.common.experiments import Registry
from services.common.health import VitalTasks, health_router
from services.common.seats import new_key
from services.common.serve import instance_name
from services.common.vendor import mount_vendor
from services.store.api import (
    api_router,
    dead_letters_router,
    install_error_handlers,
    internal_router,
    monitor_page,
)
from services.store.bots import Fleets, bots_router
from services.store.deadletters import COLLECTION, DeadLetterKeeper
from services.store.handlers import EventWriter
from services.store.metrics import StoreMetrics
from services.store.monitor import LiveHub, live_router, tickets_router
from services.store.recovery import recovery_router
from services.store.repository import Repository
from services.store.settings import StoreSettings

log = logging.getLogger(__name__)


def create_app(settings: StoreSettings) -> FastAPI:
    metrics = StoreMetrics()
    token = settings.admin_token.get_secret_value()
    # /internal: the gateway's and decisions' token, and the admin's (a superset role).
    internal = (settings.internal_bearer(), token)
    seat_secret = settings.seat_key_secret()
    repository = Repository(settings.mongo_url, settings.mongo_db)
    topology = Topology(settings.shards, settings.queue_type, service="store")
    bus = Bus(
        settings.amqp_url,
        topology,
        name=f"store {instance_name(settings)}",
        on_reconnect=metrics.bus_reconnects.inc,
    )
    # The experiments this store serves: the built-ins now, the plug-ins at start (lifespan,
    # once logging is set up: loading them logs what it found).
    experiments = Registry.builtin()
    hub = LiveHub(bus, repository, instance=instance_name(settings), experiments=experiments)
    dead_letters = DeadLetterKeeper(
        repository.quarantine.database[COLLECTION], bus, metrics.registry
    )
    fleets = Fleets()
    vital = VitalTasks()
    writer = EventWriter(
        repository,
        metrics,
        batch_size=settings.store_batch_size,
        batch_seconds=settings.store_batch_seconds,
        prefetch=settings.store_prefetch(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        experiments.load_plugins()  # logs which experiments this store serves, broken plug-ins
        await repository.setup()
        keyed = await repository.give_seats_keys(lambda: new_key(seat_secret))
        if keyed:
            log.info("gave %d participants of sessions from before v2 a seat key", keyed)
        await bus.connect()
        # Bounded by bytes, not only by messages (each up to 1,000 records): StoreSettings.
        channel = await bus.channel(prefetch=settings.store_prefetch())
        queue = await channel.declare_queue(STORE_QUEUE, passive=True)
        task = vital.watch("the event writer", asyncio.create_task(writer.run(queue)))
        await dead_letters.setup()
        dead_queue = await dead_letter_queue(await bus.channel(prefetch=16))
        keeper = vital.watch(
            "the dead-letter keeper", asyncio.create_task(dead_letters.run(dead_queue))
        )
        async with running([task, keeper]):
            yield
        await fleets.stop_all()
        await hub.close()
        await bus.close()
        await repository.close()

    async def readiness() -> list[str]:
        problems = vital.problems()  # the writer stopped: nothing is logged any more
        try:
            await repository.ping()
        except Exception:
            log.warning("MongoDB unreachable", exc_info=True)
            problems.append("MongoDB unreachable")
        if not bus.is_connected:
            return [*problems, "not connected to RabbitMQ"]
        missing = await bus.missing_consumers()
        problems.extend(f"no consumer on {name}" for name in missing)
        return problems

    app = FastAPI(
        title="Canopy store",
        lifespan=lifespan,
        description="Researchers' API: sessions, live status, event export.",
    )
    install_error_handlers(app)
    app.add_middleware(ContentSecurityPolicy, policy=CONSOLE_POLICY)
    app.include_router(
        health_router(
            metrics.registry, readiness, metrics.ready, bus=bus, blocked=metrics.bus_blocked
        )
    )
    app.include_router(
        api_router(
            repository,
            metrics,
            settings.public_url,
            token,
            seat_secret,
            max_sessions_per_minute=settings.max_sessions_per_minute,
            registry=experiments,
        )
    )
    app.include_router(tickets_router(token))
    app.include_router(bots_router(repository, fleets, token, experiments))
    app.include_router(live_router(hub, repository, token))
    app.include_router(internal_router(repository, internal))
    app.include_router(recovery_router(repository, internal))
    app.include_router(dead_letters_router(dead_letters, token))
    mount_vendor(app)
    console_files = Path(str(files("services.store").joinpath("static")))
    app.mount("/static/console", StaticFiles(directory=console_files), name="console")

    @app.get("/", include_in_schema=False)
    async def monitor() -> Response:
        return monitor_page()

    app.state.writer = writer
    app.state.hub = hub
    app.state.experiments = experiments
    return app
