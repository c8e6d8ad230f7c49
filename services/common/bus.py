"""The bus: one RabbitMQ topology for every service, publishing with confirms, ordered consumers.

Topology (declared in one place, `Topology.declare`, idempotently by every service):

    canopy.inputs   topic   shard.<i>.batch (gateways) | shard.<i>.timer (timers)
        └─▶ canopy.decisions.shard.<i>   (single active consumer: one owner per group)
    (default)       direct  canopy.gateway.<instance>
        └─▶ canopy.gateway.<instance>    (exclusive; decisions addresses the gateways that hold
                                          a group's members, learnt from their inputs)
    canopy.log      direct  log
        └─▶ canopy.store.events          (LogBatch messages from decisions: the event log)
    canopy.commands direct  timers
        └─▶ canopy.timers
    canopy.dead     fanout  └─▶ canopy.dead   (dead letters: kept by the store, deadletters.py)
    canopy.gateways fanout  └─▶ every canopy.gateway.<instance> (Resync requests)
    canopy.liveness fanout  └─▶ canopy.liveness.<instance> of every decisions worker
                                          (exclusive; GatewayAlive heartbeats)

All inputs of one group share one shard queue, so the group's state machine sees one total order.
Publishing uses publisher confirms and `mandatory`, so a message is either in a queue or the
publisher gets an exception; nothing vanishes silently.

Batches: gateways (inputs) and decisions (broadcasts) send envelopes through a `Batcher`, a group
commit per destination: the first envelope goes out at once, and envelopes that arrive while a
batch is with the broker leave together in the next one. An idle stack therefore adds no latency,
and a busy one sends fewer, larger messages, because the broker's and aio-pika's cost is per
message, not per envelope. A batch is an AMQP message of type `canopy.batch` whose body is a JSON
array of envelopes; consumers accept batches and single envelopes alike.

Dead letters, queue by queue. A message goes to `canopy.dead` only when no retry can ever
succeed: its consumer rejects it at once (a body that is no envelope or log batch, or one of a
newer major version than the reader's, see `messages`). No durable queue dead-letters after a
number of deliveries that a failure could reach any more. RabbitMQ counts a delivery each time
a consumer's channel closes with the message unacked, so with the old `x-delivery-limit` of 50
a worker in a crash loop dead-lettered, at its 51st crash, every message it held; and each of
these queues' consumers fails only transiently:

- `canopy.decisions.shard.<i>` (decisions): an input that makes experiment code raise is
  logged with its error and acked; what is left is the broker, MongoDB or the store away,
  which a redelivery cures. A dead-lettered input would be a frame already acknowledged to
  its participant, and re-driving it later could not give it back its place in the group's
  order. A handler bug that raises on one input every time stalls that shard instead, loudly
  (an ERROR per attempt): a stall a deploy cures, where a dead letter would be a loss.
- `canopy.store.events` (store): the writer holds a batch and retries MongoDB for as long as
  it is away; a record MongoDB can never take goes to the quarantine, not the whole batch.
- `canopy.timers` (timers): commands whose handling fails only while MongoDB is away.
- gateway and liveness queues are exclusive, have no dead-letter exchange, and hold nothing
  that outlives their consumer (a gateway counts and drops what it cannot forward; heartbeats
  expire after 10 s).

The limit is still declared, as `DELIVERY_LIMIT` (10^9): RabbitMQ 3.10-3.13 put a message
that a consumer nacks back at the tail of a quorum queue that has no delivery limit (at the
head of one that has), which would reorder a group's inputs whenever a handler fails once
(tests/integration/test_bus.py, test_no_delivery_limit.py); RabbitMQ 4 sets a limit of 20
where none is declared. 10^9 deliveries: a worker crashing every half second for 15 years, a
handler failing on every attempt for days.

Queues that an older Canopy declared with the limit of 50 keep it (RabbitMQ refuses to redeclare a
queue with other arguments): `Topology.declare` keeps them as they are and logs a warning;
docs/operations.md "Dead letters" says how to recreate them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractQueueIterator,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from pydantic import TypeAdapter

from services.common.failover import amqp_urls, failover_connection_class
from services.common.logs import context
from services.common.messages import Envelope, LogBatch, new_id
from services.common.ports import Publisher
from services.common.retry import retry_forever

log = logging.getLogger(__name__)

INPUTS = "canopy.inputs"
DEFAULT = ""  # the default exchange: routing key = queue name
COMMANDS = "canopy.commands"
LOG = "canopy.log"
LOG_KEY = "log"
DEAD = "canopy.dead"
GATEWAYS = "canopy.gateways"
LIVENESS = "canopy.liveness"
STORE_QUEUE = "canopy.store.events"
TIMERS_QUEUE = "canopy.timers"
TIMERS_KEY = "timers"
BATCH_TYPE = "canopy.batch"
# A batch message's size limit (`Batcher`): well under RabbitMQ's maximum message size (128 MiB
# by default since 3.10), and small enough that one batch does not hold a consumer up for long.
BATCH_MAX_BYTES = 4 * 1024 * 1024
# Gateways announce themselves this often on LIVENESS; decisions takes a gateway silent for a
# few of these (its `gateway_liveness_timeout`) for dead.
HEARTBEAT_INTERVAL = 1.0
RECONNECT_INTERVAL = 0.5  # seconds between a robust connection's attempts to come back

Properties = aiormq.spec.Basic.Properties

InputKind = Literal["frame", "presence", "timer", "batch"]
_ENVELOPES: TypeAdapter[list[Envelope]] = TypeAdapter(list[Envelope])


def encode_batch(envelopes: Sequence[Envelope]) -> bytes:
    return batch_body([envelope.encode() for envelope in envelopes])


def batch_body(encoded: Sequence[bytes]) -> bytes:
    """A batch message's body from its envelopes, each already encoded."""
    return b"[" + b",".join(encoded) + b"]"


def decode_message(message: AbstractIncomingMessage) -> list[Envelope]:
    """The envelopes of a bus message: a batch or one envelope. Raises ValueError if malformed."""
    if message.type == BATCH_TYPE:
        return _ENVELOPES.validate_json(message.body)
    return [Envelope.decode(message.body)]


def shard_of(group: str, shards: int) -> int:
    """Stable shard of a group: every publisher must agree, so no salted `hash()`."""
    return zlib.crc32(group.encode()) % shards


def shard_queue(index: int) -> str:
    return f"canopy.decisions.shard.{index}"


def input_key(group: str, shards: int, kind: InputKind) -> str:
    return f"shard.{shard_of(group, shards)}.{kind}"


def gateway_queue(instance: str) -> str:
    return f"canopy.gateway.{instance}"


# Quorum queues' delivery limit (see "Dead letters, queue by queue"), and the one before.
DELIVERY_LIMIT = 1_000_000_000
LEGACY_DELIVERY_LIMIT = 50


@dataclass(frozen=True)
class Topology:
    shards: int
    queue_type: Literal["quorum", "classic"]

    def _durable_args(self, *, single_active: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self.queue_type, "x-dead-letter-exchange": DEAD}
        if single_active:
            args["x-single-active-consumer"] = True
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = DELIVERY_LIMIT  # keeps a nacked message at the head
        return args

    async def _durable_queues(
        self, channel: AbstractChannel, queues: list[tuple[str, dict[str, Any]]]
    ) -> list[AbstractQueue]:
        """Declare durable queues; one an older Canopy declared with a delivery limit is kept
        with it. Each is tried first on a probe channel, since RabbitMQ answers a declaration
        whose arguments differ from the queue's by closing the channel."""
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        probe: aiormq.abc.AbstractChannel | None = None
        declared = []
        try:
            for name, arguments in queues:
                if probe is None or probe.is_closed:
                    probe = await underlay.connection.channel(publisher_confirms=False)
                try:
                    await probe.queue_declare(name, durable=True, arguments=arguments)
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    if "x-delivery-limit" not in str(exc) or self.queue_type != "quorum":
                        raise
                    log.warning(
                        "queue %s keeps the delivery limit an older Canopy gave it (%d): a "
                        "consumer in a crash loop would dead-letter its messages; recreate it "
                        "when it is empty (docs/operations.md, 'Dead letters')",
                        name,
                        LEGACY_DELIVERY_LIMIT,
                    )
                    arguments = arguments | {"x-delivery-limit": LEGACY_DELIVERY_LIMIT}
                declared.append(
                    await channel.declare_queue(name, durable=True, arguments=arguments)
                )
        finally:
            if probe is not None and not probe.is_closed:
                await probe.close()
        return declared

    async def declare(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        exchanges = {
            DEFAULT: channel.default_exchange,
            INPUTS: await channel.declare_exchange(INPUTS, "topic", durable=True),
            COMMANDS: await channel.declare_exchange(COMMANDS, "direct", durable=True),
            LOG: await channel.declare_exchange(LOG, "direct", durable=True),
            DEAD: await channel.declare_exchange(DEAD, "fanout", durable=True),
            GATEWAYS: await channel.declare_exchange(GATEWAYS, "fanout", durable=True),
            LIVENESS: await channel.declare_exchange(LIVENESS, "fanout", durable=True),
        }
        dead = await channel.declare_queue(
            DEAD, durable=True, arguments={"x-queue-type": self.queue_type}
        )
        await dead.bind(exchanges[DEAD])
        *shards, store, timers = await self._durable_queues(
            channel,
            [(shard_queue(i), self._durable_args(single_active=True)) for i in range(self.shards)]
            + [(STORE_QUEUE, self._durable_args()), (TIMERS_QUEUE, self._durable_args())],
        )
        for index, queue in enumerate(shards):
            await queue.bind(exchanges[INPUTS], routing_key=f"shard.{index}.*")
        await store.bind(exchanges[LOG], routing_key=LOG_KEY)
        # Before log batches, the store read frames and broadcasts straight off these
        # exchanges; a broker kept from then (make run's) must stop copying them to it.
        await store.unbind(exchanges[INPUTS], routing_key="shard.*.frame")
        await timers.bind(exchanges[COMMANDS], routing_key=TIMERS_KEY)
        return exchanges

    def required_consumers(self) -> list[str]:
        """Queues that must have a consumer before the stack can serve a session."""
        return [shard_queue(i) for i in range(self.shards)] + [STORE_QUEUE, TIMERS_QUEUE]


class Bus:
    """One robust connection, a confirming publish channel and consume channels."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        name: str,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self.topology = topology
        self._name = name
        self._on_reconnect = on_reconnect  # counts reconnects (canopy_<service>_bus_reconnects)
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._probe_channel: AbstractRobustChannel | None = None
        self._replacing: asyncio.Task[None] | None = None
        self.channel_replacements = 0  # publish channels given up on (see `_replace_channel`)

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("bus not connected")
        return self._connection

    async def connect(self, *, timeout: float = 30.0) -> None:
        urls = amqp_urls(self._url)
        self._connection = await aio_pika.connect_robust(
            urls[0],
            connection_class=failover_connection_class(urls),
            client_properties={"connection_name": self._name},
            timeout=timeout,
            # aio-pika's default is 5 s between attempts: a restarted broker would be back
            # seconds before the services noticed.
            reconnect_interval=RECONNECT_INTERVAL,
        )
        self._connection.reconnect_callbacks.add(self._reconnected)
        self._publish_channel, self._exchanges = await self._open_publish_channel()

    async def _open_publish_channel(self) -> tuple[AbstractChannel, dict[str, AbstractExchange]]:
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        return channel, await self.topology.declare(channel)

    def _reconnected(self, sender: AbstractRobustConnection | None, /) -> None:
        log.warning("%s: connection to RabbitMQ restored", self._name)
        if self._on_reconnect is not None:
            self._on_reconnect()

    async def close(self) -> None:
        if self._replacing is not None:
            self._replacing.cancel()
            await asyncio.gather(self._replacing, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def is_connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()  # clear while the robust one reconnects
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
        message_type: str | None = None,
    ) -> None:
        # aiormq's basic_publish on aio-pika's own channel, which is what aio-pika's
        # `Exchange.publish` does after building a `Message` (whose attributes cost more than
        # the properties it makes). `wait=False`: the confirm is awaited, the write to the
        # socket is not (one task switch less per publish); a write that never happens fails
        # the confirm when the channel closes. Returns and nacks raise as through aio-pika
        # (the channel is opened with `on_return_raises`).
        channel = self._publish_channel
        properties = Properties(
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            message_type=message_type,
        )
        try:
            if channel is None or channel.is_closed:
                raise ChannelInvalidStateError(f"{self._name}: publish channel closed")
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            await underlay.basic_publish(
                body,
                exchange=self._exchanges[exchange].name,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                wait=False,
            )
        except PublishError:
            raise  # unroutable: the channel is fine
        except (DeliveryError, ChannelInvalidStateError):
            self._replace_channel(channel)
            raise

    async def channel_replaced(self) -> None:
        """Wait for a publish channel replacement under way, if any."""
        if self._replacing is not None:
            await asyncio.shield(self._replacing)

    def _replace_channel(self, failed: AbstractChannel | None) -> None:
        """Give up on a publish channel the broker nacks, or that stayed closed, for a new one.

        Both were seen after a cluster node's SIGKILL (tests/cluster): a channel that published
        to a quorum queue while the queue elected a new leader had every later publish to that
        queue nacked (RabbitMQ 3.10; the queue itself served other channels), and a robust
        channel whose restore raced the reconnect stayed closed on a restored connection. A
        fresh channel is a fresh enqueuer to every queue. Publishes that fail meanwhile raise
        as before (callers retry or close the participant's socket); one replacement at a time.
        """
        if failed is not self._publish_channel or self._replacing is not None:
            return
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return  # closing, or reconnecting: the robust connection restores the channel
        self._replacing = asyncio.get_running_loop().create_task(self._replace(failed))

    async def _replace(self, failed: AbstractChannel | None) -> None:
        try:
            log.warning("%s: publish channel failed; opening a new one", self._name)

            async def reopen() -> None:
                await self.connection.ready()
                self._publish_channel, self._exchanges = await self._open_publish_channel()

            await retry_forever(
                reopen,
                "opening a publish channel",
                retry_on=(AMQPError, ConnectionError, ChannelInvalidStateError, TimeoutError),
            )
            self.channel_replacements += 1
            if failed is not None and not failed.is_closed:
                with contextlib.suppress(Exception):
                    await failed.close()
        finally:
            self._replacing = None

    async def publish_batch(
        self,
        exchange: str,
        routing_key: str,
        envelopes: Sequence[Envelope],
        *,
        mandatory: bool = True,
        reliable: bool = False,
        encoded: Sequence[bytes] | None = None,
    ) -> None:
        """Publish envelopes as one message (see `Batcher`); `reliable` as in `publish_reliably`.

        `encoded`: the envelopes already encoded, in the same order (the `Batcher` encodes each
        one as it is added, to know the batch's size), so that nothing is encoded twice."""
        body = encode_batch(envelopes) if encoded is None else batch_body(encoded)
        message_id = new_id()

        def publish() -> Awaitable[None]:
            return self.publish_raw(exchange, routing_key, body, message_id, mandatory, BATCH_TYPE)

        if reliable:
            await self._retrying(publish, f"a batch of {len(envelopes)}")
        else:
            await publish()

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
        await self._retrying(
            lambda: self.publish_raw(exchange, routing_key, body, envelope.id, mandatory),
            str(envelope.type),
        )

    @staticmethod
    async def _retrying(publish: Callable[[], Awaitable[None]], what: str) -> None:
        await retry_forever(
            publish,
            f"publishing {what}",
            retry_on=(AMQPError, ConnectionError, ChannelInvalidStateError, TimeoutError),
            give_up_on=(PublishError,),
        )

    async def channel(self, *, prefetch: int) -> AbstractChannel:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def declare_gateway_queue(self, channel: AbstractChannel, instance: str) -> AbstractQueue:
        queue = await channel.declare_queue(
            gateway_queue(instance),
            exclusive=True,
            auto_delete=True,
            arguments={"x-queue-type": "classic"},
        )
        await queue.bind(GATEWAYS)
        return queue

    async def declare_liveness_queue(
        self, channel: AbstractChannel, instance: str
    ) -> AbstractQueue:
        """A decisions worker's own queue of gateway heartbeats (gone with its connection)."""
        queue = await channel.declare_queue(
            f"{LIVENESS}.{instance}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-queue-type": "classic", "x-message-ttl": 10_000},
        )
        await queue.bind(LIVENESS)
        return queue

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


@dataclass(eq=False, slots=True)
class _Chunk:
    """One batch being gathered: its envelopes, the same encoded, and its size as a message."""

    confirmed: asyncio.Future[None]
    envelopes: list[Envelope] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)
    size: int = 1  # of `batch_body(encoded)`: "]", then each body with the "[" or "," before it


class Batcher:
    """Group commit of envelopes to one destination (exchange + routing key).

    `add` queues an envelope and returns a future that completes when the broker confirmed the
    batch holding it (or fails with that batch's error). Batches leave in order. With nothing
    in flight, an envelope leaves at the end of the current event-loop iteration (so envelopes
    added by one burst of work share a message) and waits for nobody; while a batch is with the
    broker, whatever is added waits and leaves together with the rest once it is confirmed.

    `patience`: a batch whose confirm takes longer than this (a broker disk sync) no longer
    holds up the next one; up to `max_in_flight` batches are then out at once, one per
    `patience`. Without it, `max_in_flight` batches go out without waiting for each other.

    A batch holds at most `max_items` envelopes and `max_bytes` bytes (an envelope bigger than
    that goes alone). The byte budget matters for broadcasts of up to 256 KiB (PROTOCOL v2):
    500 of them would make a message of about 128 MiB, RabbitMQ's default maximum, which the
    broker refuses, and a reliable publish would retry it forever. Each envelope is encoded
    once, when it is added: that gives its size, and the batch is published from those bytes.
    """

    def __init__(
        self,
        bus: Publisher,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool,
        reliable: bool,
        max_in_flight: int = 1,
        patience: float | None = None,
        max_items: int = 500,
        max_bytes: int = BATCH_MAX_BYTES,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._bus = bus
        self._exchange = exchange
        self._routing_key = routing_key
        self._mandatory = mandatory
        self._reliable = reliable
        self._max_in_flight = max_in_flight
        self._patience = patience
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._on_batch = on_batch
        self._chunks: deque[_Chunk] = deque()
        self._in_flight = 0
        self._last_sent = float("-inf")
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> bool:
        return not self._chunks and not self._in_flight

    def add(self, envelope: Envelope) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        try:
            body = envelope.encode()
        except Exception as exc:  # a payload JSON cannot hold: fails this envelope, not a batch
            failed: asyncio.Future[None] = loop.create_future()
            failed.set_exception(exc)
            return failed
        size = len(body) + 1  # with the comma (or bracket) before it
        chunk = self._chunks[-1] if self._chunks else None
        if (
            chunk is None
            or chunk.size + size > self._max_bytes
            or len(chunk.encoded) >= self._max_items
        ):
            chunk = _Chunk(loop.create_future())
            self._chunks.append(chunk)
        chunk.envelopes.append(envelope)
        chunk.encoded.append(body)
        chunk.size += size
        if not self._scheduled and self._timer is None:
            self._schedule(loop)
        return chunk.confirmed

    def _next_send_at(self) -> float | None:
        """When the next batch may leave (loop time), or None until a confirm arrives."""
        if self._in_flight == 0:
            return float("-inf")
        if self._in_flight >= self._max_in_flight:
            return None
        if self._patience is None:
            return float("-inf")
        return self._last_sent + self._patience

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        at = self._next_send_at()
        if at is None:
            return
        if at <= loop.time():
            self._scheduled = True
            loop.call_soon(self._send)
        else:
            self._timer = loop.call_at(at, self._send)

    def _send(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._chunks:
            at = self._next_send_at()
            if at is None or at > loop.time():
                break
            chunk = self._chunks.popleft()
            self._in_flight += 1
            self._last_sent = loop.time()
            if self._on_batch is not None:
                self._on_batch(len(chunk.envelopes))
            task = loop.create_task(self._publish(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._chunks:
            self._schedule(loop)

    async def _publish(self, chunk: _Chunk) -> None:
        confirmed = chunk.confirmed
        try:
            await self._bus.publish_batch(
                self._exchange,
                self._routing_key,
                chunk.envelopes,
                mandatory=self._mandatory,
                reliable=self._reliable,
                encoded=chunk.encoded,
            )
        except asyncio.CancelledError:
            self._in_flight -= 1
            confirmed.cancel()
            raise
        except Exception as exc:
            if not confirmed.done():
                confirmed.set_exception(exc)
                confirmed.exception()  # retrieved: a batch nobody waits for any more is fine
        else:
            if not confirmed.done():
                confirmed.set_result(None)
        self._in_flight -= 1
        self._send()

    async def close(self) -> None:
        """Wait for what was added to be published (or to fail)."""
        while self._tasks or self._chunks:
            if not self._tasks:
                self._send()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
    stop: asyncio.Event | None = None,
) -> None:
    """Like `consume_in_order`, but without waiting for one message's outputs to be confirmed
    before handling the next.

    `handler` does its ordered work (state changes, starting publishes in order) and returns an
    awaitable that completes once the message's outputs are confirmed; the message is acked
    then, in the background. The broker's prefetch bounds how many are in flight.

    Setting `stop` hands the queue over gracefully: the consumer is cancelled, messages
    delivered but not handled yet go back to the queue, and the function returns once every
    handled message is acknowledged (a shard moving to another worker, a drain). Cancelling
    the task instead abandons what is in flight (the broker redelivers it).
    """
    in_flight: dict[asyncio.Task[None], list[Awaitable[Any]]] = {}

    async def ack_when_done(message: AbstractIncomingMessage, dones: list[Awaitable[Any]]) -> None:
        try:
            for done in dones:  # already under way: awaiting them in turn waits for the slowest
                await done
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "outputs of a message on %s failed; message requeued",
                queue.name,
                extra=context(message_id=message.message_id),
            )
            _discard(dones)
            await _settle(message, queue.name, ack=False)
            return
        await _settle(message, queue.name, ack=True)

    stopper: asyncio.Task[None] | None = None
    try:
        async with queue.iterator() as messages:
            if stop is not None:
                stopper = asyncio.create_task(_close_when_set(stop, messages))
            async for message in messages:
                try:
                    envelopes = decode_message(message)
                except ValueError as exc:
                    log.error(
                        "malformed message on %s rejected: %s",
                        queue.name,
                        exc,
                        extra=context(message_id=message.message_id),
                    )
                    if on_malformed is not None:
                        on_malformed(message, exc)
                    await message.reject(requeue=False)
                    continue
                dones: list[Awaitable[Any]] = []
                try:
                    for envelope in envelopes:
                        dones.append(await handler(envelope))
                except asyncio.CancelledError:
                    _discard(dones)
                    raise
                except Exception:
                    # Redelivered whole: the envelopes handled already are handled idempotently.
                    log.exception(
                        "handler failed on %s; message requeued",
                        queue.name,
                        extra=context(message_id=message.message_id),
                    )
                    _discard(dones)
                    await _settle(message, queue.name, ack=False)
                    continue
                task = asyncio.create_task(ack_when_done(message, dones))
                in_flight[task] = dones
                task.add_done_callback(in_flight.pop)
        if in_flight:  # stopped: finish and acknowledge what was handled
            await asyncio.gather(*in_flight)
    finally:
        if stopper is not None:
            stopper.cancel()
        for task, dones in list(in_flight.items()):
            task.cancel()
            _discard(dones)


async def _settle(message: AbstractIncomingMessage, queue: str, *, ack: bool) -> None:
    """Ack (or nack and requeue) a delivery. If its channel is gone meanwhile (a broker
    node died), the broker requeues it by itself and the handler sees it again."""
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except (ChannelInvalidStateError, AMQPError) as exc:
        log.info(
            "%s of a message on %s lost with its channel (%r); the broker redelivers it",
            "ack" if ack else "nack",
            queue,
            exc,
            extra=context(message_id=message.message_id),
        )


async def _close_when_set(stop: asyncio.Event, messages: AbstractQueueIterator) -> None:
    await stop.wait()
    await messages.close()


def _discard(awaitables: list[Awaitable[Any]]) -> None:
    """Close coroutines that will never be awaited now (no 'never awaited' warnings)."""
    for awaitable in awaitables:
        if (
            inspect.iscoroutine(awaitable)
            and inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED
        ):
            awaitable.close()


@asynccontextmanager
async def running(tasks: list[asyncio.Task[Any]]) -> AsyncIterator[None]:
    """Cancel and await background tasks on exit (service shutdown)."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
