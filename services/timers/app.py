"""Composition root of the timers service: bus, the schedules' repository, the worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.bus import Bus, Topology, running
from services.common.health import VitalTasks, health_router
from services.common.serve import instance_name
from services.timers.handlers import TimersWorker
from services.timers.metrics import TimersMetrics
from services.timers.repository import TimersRepository
from services.timers.settings import TimersSettings


def create_app(settings: TimersSettings) -> FastAPI:
    metrics = TimersMetrics()
    topology = Topology(settings.shards, settings.queue_type, service="timers")
    instance = instance_name(settings)
    bus = Bus(
        settings.amqp_url,
        topology,
        name=f"timers {instance}",
        on_reconnect=metrics.bus_reconnects.inc,
    )
    repository = TimersRepository(settings.mongo_url, settings.mongo_db)
    worker = TimersWorker(
        bus, repository, metrics, owner=instance, lease_seconds=settings.timers_lease_seconds
    )
    vital = VitalTasks()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await repository.setup()
        await bus.connect()
        channel = await bus.channel(prefetch=100)
        task = vital.watch("the timers worker", asyncio.create_task(worker.run(channel)))
        async with running([task]):
            yield
        await worker.close()
        await bus.close()
        await repository.close()

    async def readiness() -> list[str]:
        problems = vital.problems()
        consumer = worker.consumer  # while leading: without it no period would ever start
        if consumer is not None and consumer.done():
            problems.append("the timers queue's consumer stopped")
        if not bus.is_connected:
            problems.append("not connected to RabbitMQ")
        try:
            await repository.ping()
        except Exception:
            problems.append("MongoDB unreachable")
        return problems

    app = FastAPI(title="Canopy timers", lifespan=lifespan)
    app.include_router(
        health_router(
            metrics.registry, readiness, metrics.ready, bus=bus, blocked=metrics.bus_blocked
        )
    )
    app.state.worker = worker
    return app
