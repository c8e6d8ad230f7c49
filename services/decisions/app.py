"""Composition root of the decisions service: `create_app(settings)` wires bus, store look-ups,
the worker and one ordered consumer per shard queue.

Start-up order is what makes a restart safe: connect, wait until the log holds everything a
previous worker sent (`wait_for_log`), then consume the shard queues (each group is rebuilt from
its log before its first input), then ask the gateways to announce their connections again.
Readiness is false until the shard queues are consumed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.bus import Bus, Topology, consume_pipelined, running, shard_queue
from services.common.directory import Directory
from services.common.health import health_router
from services.common.serve import instance_name
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.decisions.settings import DecisionsSettings

log = logging.getLogger(__name__)


def create_app(settings: DecisionsSettings) -> FastAPI:
    metrics = DecisionsMetrics()
    topology = Topology(settings.shards, settings.queue_type)
    bus = Bus(settings.amqp_url, topology, name=f"decisions {instance_name(settings)}")
    directory = Directory(settings.store_url, settings.admin_token.get_secret_value())
    log_writer = LogWriter(
        bus, interval=settings.log_batch_seconds, max_records=settings.log_batch_records
    )
    worker = DecisionsWorker(
        bus,
        directory,
        metrics,
        log_writer,
        resync_window=settings.resync_window,
        liveness_timeout=settings.gateway_liveness_timeout,
    )
    consuming = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.connect()
        waited = await worker.wait_for_log()
        log.info("the log holds everything sent before this start (waited %.3f s)", waited)
        channel = await bus.channel(prefetch=settings.decisions_prefetch)
        liveness = await bus.declare_liveness_queue(channel, instance_name(settings))
        await liveness.consume(worker.on_heartbeat, no_ack=True)
        tasks = [asyncio.create_task(worker.watch_gateways())]
        for index in range(settings.shards):
            queue = await channel.declare_queue(shard_queue(index), passive=True)
            tasks.append(
                asyncio.create_task(
                    consume_pipelined(
                        queue, worker.handle, on_malformed=lambda m, e: metrics.rejected.inc()
                    )
                )
            )
        await worker.request_resync()
        consuming.set()
        async with running(tasks):
            yield
        await worker.close()
        await log_writer.close()
        await directory.close()
        await bus.close()

    async def readiness() -> list[str]:
        if not bus.is_connected:
            return ["not connected to RabbitMQ"]
        return [] if consuming.is_set() else ["waiting for the event log"]

    app = FastAPI(title="Canopy decisions", lifespan=lifespan)
    app.include_router(health_router(metrics.registry, readiness))
    app.state.worker = worker
    return app
