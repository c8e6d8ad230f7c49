"""The bus's connection: one robust connection with failover across the broker's nodes, a
confirming publish channel (replaced when the broker gives up on it), consume channels.

Publishing uses publisher confirms and `mandatory`, so a message is either in a queue or the
publisher gets an exception; nothing vanishes silently.

`Bus.blocked` says whether RabbitMQ blocks this connection: during a memory or disk alarm the
broker stops reading from every connection that publishes (it sends `connection.blocked` at
the first publish after the alarm, `connection.unblocked` when it clears). Nothing it sends
is confirmed meanwhile, nor are acks or requests on that connection read, so a service that
went on taking input would only buffer it (docs/reliability.md, "RabbitMQ blocks
publishers"); readiness fails and the gateway refuses new sockets instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)

from services.common.bus.topology import Topology, declare_gateway_queue, declare_liveness_queue
from services.common.bus.wire import BATCH_TYPE, batch_body, encode_batch
from services.common.failover import amqp_urls, failover_connection_class
from services.common.messages import Envelope, LogBatch, new_id
from services.common.retry import retry_forever

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 0.5  # seconds between a robust connection's attempts to come back

# aiormq 7.2 handles connection.blocked / unblocked in these private methods of its
# `Connection` (it only logs them and holds its writer back); aio-pika passes nothing on. The
# bus wraps them on each new underlying connection (see `Bus._watch_blocking`).
_ON_BLOCKED = "_Connection__handle_connection_blocked"
_ON_UNBLOCKED = "_Connection__handle_connection_unblocked"
if not all(hasattr(aiormq.Connection, name) for name in (_ON_BLOCKED, _ON_UNBLOCKED)):
    raise RuntimeError("this aiormq does not handle connection.blocked as 7.2 does: pin it")

Properties = aiormq.spec.Basic.Properties


class Bus:
    """One robust connection, a confirming publish channel and consume channels."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        name: str,
        on_reconnect: Callable[[], None] | None = None,
        on_unblocked: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self.topology = topology
        self._name = name
        self._on_reconnect = on_reconnect  # counts reconnects (canopy_<service>_bus_reconnects)
        self._on_unblocked = on_unblocked  # the broker reads the connection again
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._probe_channel: AbstractRobustChannel | None = None
        self._replacing: asyncio.Task[None] | None = None
        # Every channel of the current underlying connection restored (see `is_connected`).
        self._restored = False
        self.channel_replacements = 0  # publish channels given up on (see `_replace_channel`)
        # Why RabbitMQ blocks this connection (a memory or disk alarm), None while it does not.
        self.blocked_reason: str | None = None

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("bus not connected")
        return self._connection

    @property
    def blocked(self) -> bool:
        """RabbitMQ blocks this connection (a resource alarm): nothing published is confirmed,
        and nothing sent on the connection (acks, declarations) is read, until it clears."""
        return self.blocked_reason is not None

    async def connect(self, *, timeout: float = 30.0) -> None:
        urls = amqp_urls(self._url)
        bus = self

        class Watched(failover_connection_class(urls)):  # type: ignore[misc]
            async def _on_connected(self) -> None:
                # Each (re)connect makes a new underlying connection, not blocked to begin with.
                bus._watch_blocking(self)
                bus._restored = False
                await super()._on_connected()  # raises if a channel could not be restored
                bus._restored = True

        self._connection = await aio_pika.connect_robust(
            urls[0],
            connection_class=Watched,
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

    def _watch_blocking(self, connection: AbstractRobustConnection) -> None:
        """Follow connection.blocked / unblocked on `connection`'s new underlying connection
        (which starts unblocked: the broker blocks a connection at its first publish)."""
        transport = connection.transport
        if transport is None:
            return
        underlay = transport.connection
        self._set_blocked(None)
        on_blocked = getattr(underlay, _ON_BLOCKED)
        on_unblocked = getattr(underlay, _ON_UNBLOCKED)

        def current() -> bool:  # not a late frame of an underlying connection since replaced
            return connection.transport is not None and connection.transport.connection is underlay

        async def blocked(frame: aiormq.spec.Connection.Blocked) -> None:
            await on_blocked(frame)
            if current():
                self._set_blocked(frame.reason or "no reason given")

        async def unblocked(frame: aiormq.spec.Connection.Unblocked) -> None:
            await on_unblocked(frame)
            if current():
                self._set_blocked(None)

        # Instance attributes: they take the place of the class's methods for this one
        # connection (aiormq looks them up on `self` for every frame).
        setattr(underlay, _ON_BLOCKED, blocked)
        setattr(underlay, _ON_UNBLOCKED, unblocked)

    def _set_blocked(self, reason: str | None) -> None:
        if (reason is None) == (self.blocked_reason is None):
            return
        self.blocked_reason = reason
        if reason is None:
            log.warning("%s: RabbitMQ no longer blocks the connection", self._name)
            if self._on_unblocked is not None:
                self._on_unblocked()
        else:
            log.error("%s: RabbitMQ blocks the connection (%s)", self._name, reason)

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
        """Connected, and every channel restored after the last reconnect.

        aio-pika sets `connected` as soon as a new underlying connection is open, then restores
        the channels one by one (their queues, bindings and consumers); a channel whose restore
        fails (a declaration or binding refused) closes that connection, and the next attempt
        comes 0.5 s later. Meanwhile the publish channel may work while a consumer is not back:
        a gateway that took a socket then published its presence, and decisions' `hello` went
        to a queue that did not exist yet (tests/integration/test_bus_restore.py)."""
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()  # clear while the robust one reconnects
            and self._restored
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
        return await declare_gateway_queue(channel, instance)

    async def declare_liveness_queue(
        self, channel: AbstractChannel, instance: str
    ) -> AbstractQueue:
        """A decisions worker's own queue of gateway heartbeats (gone with its connection)."""
        return await declare_liveness_queue(channel, instance)

    async def missing_consumers(self) -> list[str]:
        """Queues among `topology.required_consumers()` that have no consumer right now."""
        missing = []
        for name in self.topology.required_consumers():
            if self._probe_channel is None or self._probe_channel.is_closed:
                self._probe_channel = await self.connection.channel(publisher_confirms=False)
            try:
                # robust=False: a robust channel caches declarations, would repeat an answer.
                queue = await self._probe_channel.declare_queue(name, passive=True, robust=False)
            except ChannelNotFoundEntity:
                # Not declared yet: its service (the one that declares it) never started on
                # this broker. RabbitMQ closed the channel with its answer.
                missing.append(name)
                with contextlib.suppress(Exception):
                    await self._probe_channel.close()
                self._probe_channel = None
                continue
            result = queue.declaration_result
            if not result.consumer_count:
                missing.append(name)
        return missing
