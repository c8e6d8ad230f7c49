"""Composition root of the timers service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.bus import TIMERS_QUEUE, Bus, Topology, consume_in_order, running
from services.common.health import health_router
from services.common.serve import instance_name
from services.timers.handlers import TimersWorker
from services.timers.metrics import TimersMetrics
from services.timers.settings import TimersSettings


def create_app(settings: TimersSettings) -> FastAPI:
    metrics = TimersMetrics()
    topology = Topology(settings.shards, settings.queue_type)
    bus = Bus(settings.amqp_url, topology, name=f"timers {instance_name(settings)}")
    worker = TimersWorker(bus, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.connect()
        channel = await bus.channel(prefetch=100)
        queue = await channel.declare_queue(TIMERS_QUEUE, passive=True)
        task = asyncio.create_task(
            consume_in_order(queue, worker.handle, on_malformed=lambda m, e: metrics.rejected.inc())
        )
        async with running([task]):
            yield
        await worker.close()
        await bus.close()

    async def readiness() -> list[str]:
        return [] if bus.is_connected else ["not connected to RabbitMQ"]

    app = FastAPI(title="Canopy timers", lifespan=lifespan)
    app.include_router(health_router(metrics.registry, readiness))
    return app
