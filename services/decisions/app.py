"""Composition root of the decisions service: `create_app(settings)` wires bus, store look-ups,
the worker and one ordered consumer per shard queue.

A worker consumes the shard queues whose lease it holds (`ownership.ShardOwnership`: the shards
spread over the live workers). Taking shards over is what makes a restart or a move safe: wait
until the log holds everything a previous owner sent (`wait_for_log`), then consume (each group
is rebuilt from its log before its first input), then ask the gateways to announce the
connections of those shards' groups again. Handing a shard over (to balance, or at shutdown)
stops its consumer, waits until what it handled is acknowledged, drops its groups' state and
releases the lease. Readiness is false until the first lease step reached MongoDB."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractChannel
from fastapi import FastAPI

from services.common.bus import (
    Bus,
    ConsumerHalted,
    Topology,
    consume_pipelined,
    running,
    shard_queue,
)
from services.common.directory import Directory
from services.common.experiments import Registry
from services.common.health import VitalTasks, health_router
from services.common.serve import instance_name
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.decisions.ownership import ShardOwnership
from services.decisions.repository import DecisionsRepository
from services.decisions.settings import DecisionsSettings

log = logging.getLogger(__name__)


def create_app(settings: DecisionsSettings) -> FastAPI:
    metrics = DecisionsMetrics()
    topology = Topology(settings.shards, settings.queue_type, service="decisions")
    bus = Bus(
        settings.amqp_url,
        topology,
        name=f"decisions {instance_name(settings)}",
        on_reconnect=metrics.bus_reconnects.inc,
    )
    directory = Directory(settings.store_url, settings.internal_bearer())
    # The experiments this worker runs: the built-ins now, the plug-ins at start (lifespan,
    # once logging is set up: loading them logs what it found).
    experiments = Registry.builtin()
    log_writer = LogWriter(
        bus,
        interval=settings.log_batch_seconds,
        max_records=settings.log_batch_records,
        max_bytes=settings.log_batch_bytes,
    )
    worker = DecisionsWorker(
        bus,
        directory,
        metrics,
        log_writer,
        resync_window=settings.resync_window,
        liveness_timeout=settings.gateway_liveness_timeout,
        experiments=experiments,
    )
    repository = DecisionsRepository(settings.mongo_url, settings.mongo_db)
    consumers: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
    vital = VitalTasks()
    channels: list[AbstractChannel] = []

    async def consume_shard(index: int, stop: asyncio.Event) -> None:
        """Consume one shard queue in order until `stop`, on a channel of its own: closing it
        puts back whatever was delivered and not handled, in the order it was delivered (see
        `consume_pipelined`). An input that fails (the store unreachable for a rebuild) stops
        the consumer before it; it starts again after a pause, from that input on."""
        while not stop.is_set():
            channel = await bus.channel(prefetch=settings.decisions_prefetch)
            try:
                queue = await channel.declare_queue(shard_queue(index), passive=True)
                await consume_pipelined(
                    queue,
                    worker.handle,
                    on_malformed=lambda m, e: metrics.malformed.inc(),
                    stop=stop,
                    halt_on_failure=True,
                )
            except ConsumerHalted:
                metrics.consumer_halts.inc()
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.shard_retry_seconds)

    async def claim(shards: list[int]) -> None:
        """Consume shards just taken over, once the log holds what their last owner sent."""
        waited = await worker.wait_for_log()
        log.info("shards %s: the log holds everything sent before (waited %.3f s)", shards, waited)
        for index in shards:
            stop = asyncio.Event()
            task = asyncio.create_task(consume_shard(index, stop))
            consumers[index] = (task, stop)
            vital.watch(f"the consumer of shard {index}", task)
        await worker.request_resync(shards)

    async def release(index: int) -> None:
        """Stop consuming a shard: what was handled is acknowledged, the rest goes back."""
        consumer = consumers.pop(index, None)
        if consumer is None:  # handed back while being taken over, before it was consumed
            dropped = worker.forget_shard(index, settings.shards)
            log.info(
                "shard %d handed back before it was consumed (%d groups dropped)", index, dropped
            )
            return
        task, stop = consumer
        vital.forget(f"the consumer of shard {index}")  # it ends now, on purpose
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), settings.shard_release_timeout)
        except TimeoutError:
            log.warning("shard %d: in-flight inputs not confirmed in time; abandoned", index)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its channel closes
        except Exception:
            log.exception("shard %d's consumer failed while stopping", index)
        dropped = worker.forget_shard(index, settings.shards)
        log.info("shard %d handed over (%d groups dropped)", index, dropped)

    ownership = ShardOwnership(
        repository,
        owner=instance_name(settings),
        shards=settings.shards,
        ttl=settings.shard_lease_seconds,
        claim=claim,
        release=release,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        experiments.load_plugins()  # logs which experiments this worker runs, broken plug-ins
        await bus.connect()
        channel = await bus.channel(prefetch=settings.decisions_prefetch)
        channels.append(channel)
        liveness = await bus.declare_liveness_queue(channel, instance_name(settings))
        await liveness.consume(worker.on_heartbeat, no_ack=True)
        leasing = vital.watch("the shard leases", asyncio.create_task(ownership.run()))
        watching = vital.watch("the gateways' watch", asyncio.create_task(worker.watch_gateways()))
        async with running([watching]):
            yield
            # Graceful stop: hand every shard over (finishing what is in flight) first.
            leasing.cancel()
            await asyncio.gather(leasing, return_exceptions=True)
            await ownership.close()
        for task, _ in consumers.values():
            task.cancel()
        await worker.close()
        await log_writer.close()
        await directory.close()
        await repository.close()
        await bus.close()

    async def readiness() -> list[str]:
        stopped = vital.problems()  # a shard's consumer or the leases: groups would wait
        if not bus.is_connected:
            return [*stopped, "not connected to RabbitMQ"]
        if not ownership.stepped.is_set():
            return [*stopped, "waiting for shard leases and the log"]
        return stopped

    app = FastAPI(title="Canopy decisions", lifespan=lifespan)
    app.include_router(
        health_router(
            metrics.registry, readiness, metrics.ready, bus=bus, blocked=metrics.bus_blocked
        )
    )
    app.state.worker = worker
    app.state.experiments = experiments
    return app
