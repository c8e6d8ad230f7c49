"""Composition root of the gateway: bus, store look-ups, the hub, the participants' routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.common.bus import Bus, Topology, gateway_queue, running
from services.common.directory import Directory
from services.common.health import health_router
from services.common.serve import instance_name
from services.gateway.api import Participants, participant_router
from services.gateway.handlers import Hub
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    instance = instance_name(settings)
    bus = Bus(
        settings.amqp_url,
        Topology(settings.shards, settings.queue_type),
        name=f"gateway {instance}",
    )
    directory = Directory(settings.store_url, settings.admin_token.get_secret_value())
    hub = Hub(metrics)
    participants = Participants(
        settings, bus, directory, hub, metrics, gateway=gateway_queue(instance)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.connect()
        channel = await bus.channel(prefetch=0)
        queue = await bus.declare_gateway_queue(channel, instance)
        task = asyncio.create_task(hub.consume(queue))
        async with running([task]):
            yield
        await participants.close()
        await directory.close()
        await bus.close()

    async def readiness() -> list[str]:
        if not bus.is_connected:
            return ["not connected to RabbitMQ"]
        problems = [f"no consumer on {name}" for name in await bus.missing_consumers()]
        if not await directory.reachable():
            problems.append("store unreachable")
        return problems

    app = FastAPI(title="Canopy gateway", lifespan=lifespan)
    app.include_router(health_router(metrics.registry, readiness))
    app.include_router(participant_router(participants))
    static_dir = Path(str(files("services.gateway").joinpath("static")))
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    app.state.hub = hub
    return app
