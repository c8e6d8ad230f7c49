"""The bus: one RabbitMQ topology for every service, publishing with confirms, ordered consumers.

Topology (declared in one place, `Topology.declare`, idempotently by every service):

    canopy.inputs   topic   shard.<i>.frame | shard.<i>.presence | shard.<i>.timer
        └─▶ canopy.decisions.shard.<i>   (single active consumer: one owner per group)
    canopy.outputs  topic   group.<group>.event | group.<group>.control
        └─▶ canopy.gateway.<instance>    (exclusive; bound per group while a member is here)
    canopy.log      direct  log
        └─▶ canopy.store.events          (LogBatch messages from decisions: the event log)
    canopy.commands direct  timers
        └─▶ canopy.timers
    canopy.dead     fanout  └─▶ canopy.dead   (messages a consumer rejected as malformed)

All inputs of one group share one shard queue, so the group's state machine sees one total order.
Publishing uses publisher confirms and `mandatory`, so a message is either in a queue or the
publisher gets an exception; nothing vanishes silently.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, PublishError

from services.common.messages import Envelope, LogBatch

log = logging.getLogger(__name__)

INPUTS = "canopy.inputs"
OUTPUTS = "canopy.outputs"
COMMANDS = "canopy.commands"
LOG = "canopy.log"
LOG_KEY = "log"
DEAD = "canopy.dead"
STORE_QUEUE = "canopy.store.events"
TIMERS_QUEUE = "canopy.timers"
TIMERS_KEY = "timers"

InputKind = Literal["frame", "presence", "timer"]


def shard_of(group: str, shards: int) -> int:
    """Stable shard of a group: every publisher must agree, so no salted `hash()`."""
    return zlib.crc32(group.encode()) % shards


def shard_queue(index: int) -> str:
    return f"canopy.decisions.shard.{index}"


def input_key(group: str, shards: int, kind: InputKind) -> str:
    return f"shard.{shard_of(group, shards)}.{kind}"


def output_key(group: str, *, logged: bool) -> str:
    return f"group.{group}.{'event' if logged else 'control'}"


def group_binding(group: str) -> str:
    return f"group.{group}.*"


def gateway_queue(instance: str) -> str:
    return f"canopy.gateway.{instance}"


@dataclass(frozen=True)
class Topology:
    shards: int
    queue_type: Literal["quorum", "classic"]

    def _durable_args(self, *, single_active: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self.queue_type, "x-dead-letter-exchange": DEAD}
        if single_active:
            args["x-single-active-consumer"] = True
        if self.queue_type == "quorum":
            # A message whose handler keeps failing is dead-lettered instead of looping forever.
            args["x-delivery-limit"] = 50
        return args

    async def declare(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        exchanges = {
            INPUTS: await channel.declare_exchange(INPUTS, "topic", durable=True),
            OUTPUTS: await channel.declare_exchange(OUTPUTS, "topic", durable=True),
            COMMANDS: await channel.declare_exchange(COMMANDS, "direct", durable=True),
            LOG: await channel.declare_exchange(LOG, "direct", durable=True),
            DEAD: await channel.declare_exchange(DEAD, "fanout", durable=True),
        }
        dead = await channel.declare_queue(
            DEAD, durable=True, arguments={"x-queue-type": self.queue_type}
        )
        await dead.bind(exchanges[DEAD])
        for index in range(self.shards):
            queue = await channel.declare_queue(
                shard_queue(index), durable=True, arguments=self._durable_args(single_active=True)
            )
            await queue.bind(exchanges[INPUTS], routing_key=f"shard.{index}.*")
        store = await channel.declare_queue(
            STORE_QUEUE, durable=True, arguments=self._durable_args()
        )
        await store.bind(exchanges[LOG], routing_key=LOG_KEY)
        # Before log batches, the store read frames and broadcasts straight off these
        # exchanges; a broker kept from then (make run's) must stop copying them to it.
        await store.unbind(exchanges[INPUTS], routing_key="shard.*.frame")
        await store.unbind(exchanges[OUTPUTS], routing_key="group.*.event")
        timers = await channel.declare_queue(
            TIMERS_QUEUE, durable=True, arguments=self._durable_args()
        )
        await timers.bind(exchanges[COMMANDS], routing_key=TIMERS_KEY)
        return exchanges

    def required_consumers(self) -> list[str]:
        """Queues that must have a consumer before the stack can serve a session."""
        return [shard_queue(i) for i in range(self.shards)] + [STORE_QUEUE, TIMERS_QUEUE]


class Bus:
    """One robust connection, a confirming publish channel and consume channels."""

    def __init__(self, url: str, topology: Topology, *, name: str) -> None:
        self._url = url
        self.topology = topology
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._probe_channel: AbstractRobustChannel | None = None

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("bus not connected")
        return self._connection

    async def connect(self, *, timeout: float = 30.0) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url, client_properties={"connection_name": self._name}, timeout=timeout
        )
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchanges = await self.topology.declare(self._publish_channel)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def is_connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._publish_channel is not None
            and not self._publish_channel.is_closed
        )

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raises if unroutable or refused."""
        await self.publish_raw(exchange, routing_key, envelope.encode(), envelope.id, mandatory)

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        mandatory: bool = True,
    ) -> None:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        await self._exchanges[exchange].publish(message, routing_key, mandatory=mandatory)

    async def publish_reliably(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish until the broker confirms, riding out connection loss and refusals.

        An unroutable mandatory message (PublishError) is a wiring error and is raised: retrying
        cannot help. Anything else (connection or channel lost, broker nack) is retried with
        backoff while the robust connection restores itself.
        """
        body = envelope.encode()
        delay = 0.05
        while True:
            try:
                await self.publish_raw(exchange, routing_key, body, envelope.id, mandatory)
                return
            except PublishError:
                raise
            except (AMQPError, ConnectionError, ChannelInvalidStateError, TimeoutError) as exc:
                log.warning(
                    "publishing %s failed (%r); retrying in %.2fs", envelope.type, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def channel(self, *, prefetch: int) -> AbstractChannel:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def declare_gateway_queue(self, channel: AbstractChannel, instance: str) -> AbstractQueue:
        return await channel.declare_queue(
            gateway_queue(instance),
            exclusive=True,
            auto_delete=True,
            arguments={"x-queue-type": "classic"},
        )

    async def missing_consumers(self) -> list[str]:
        """Queues among `topology.required_consumers()` that have no consumer right now."""
        if self._probe_channel is None or self._probe_channel.is_closed:
            self._probe_channel = await self.connection.channel(publisher_confirms=False)
        missing = []
        for name in self.topology.required_consumers():
            # robust=False: a robust channel caches declarations and would repeat the first answer.
            queue = await self._probe_channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            if not result.consumer_count:
                missing.append(name)
        return missing


Handler = Callable[[Envelope], Awaitable[None]]


async def completed() -> None:
    """An awaitable with nothing to wait for (a pipelined handler's 'no outputs')."""


async def consume_in_order(
    queue: AbstractQueue,
    handler: Handler,
    *,
    on_malformed: Callable[[AbstractIncomingMessage, Exception], None] | None = None,
) -> None:
    """Run `handler` on each message of `queue`, one at a time, in queue order.

    Outcomes: the handler returns → ack; the body is not a valid envelope → reject to the
    dead-letter queue (it can never succeed); the handler raises → nack and requeue, so the
    message is retried rather than lost (the handler must be idempotent, which ours are).
    """

    async def inline(envelope: Envelope) -> Awaitable[None]:
        await handler(envelope)
        return completed()

    await consume_pipelined(queue, inline, on_malformed=on_malformed)


Pipelined = Callable[[Envelope], Awaitable[Awaitable[Any]]]


async def consume_pipelined(
    queue: AbstractQueue,
    handler: Pipelined,
    *,
    on_malformed: Callable[[AbstractIncomingMessage, Exception], None] | None = None,
) -> None:
    """Like `consume_in_order`, but without waiting for one message's outputs to be confirmed
    before handling the next.

    `handler` does its ordered work (state changes, starting publishes in order) and returns an
    awaitable that completes once the message's outputs are confirmed; the message is acked
    then, in the background. The broker's prefetch bounds how many are in flight.
    """
    in_flight: set[asyncio.Task[None]] = set()

    async def ack_when_done(message: AbstractIncomingMessage, done: Awaitable[Any]) -> None:
        try:
            await done
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("outputs of a message on %s failed; message requeued", queue.name)
            await message.nack(requeue=True)
            return
        await message.ack()

    try:
        async with queue.iterator() as messages:
            async for message in messages:
                try:
                    envelope = Envelope.decode(message.body)
                except ValueError as exc:
                    log.error("malformed message on %s rejected: %s", queue.name, exc)
                    if on_malformed is not None:
                        on_malformed(message, exc)
                    await message.reject(requeue=False)
                    continue
                try:
                    done = await handler(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("handler failed on %s; message requeued", queue.name)
                    await message.nack(requeue=True)
                    continue
                task = asyncio.create_task(ack_when_done(message, done))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
    finally:
        for task in in_flight:
            task.cancel()


@asynccontextmanager
async def running(tasks: list[asyncio.Task[Any]]) -> AsyncIterator[None]:
    """Cancel and await background tasks on exit (service shutdown)."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
