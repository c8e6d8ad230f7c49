"""The bus's topology: every exchange and queue of Canopy, declared here and nowhere else.

Durable exchanges and queues are declared by `Topology.declare`, idempotently by every service;
per-instance queues (a gateway's, a decisions worker's liveness queue, a live monitor's) by the
`declare_*_queue` functions below, by the instance that owns them.

    canopy.inputs   topic   shard.<i>.batch (gateways) | shard.<i>.timer (timers)
        └─▶ canopy.decisions.shard.<i>   (single active consumer: one owner per group)
    (default)       direct  canopy.gateway.<instance>
        └─▶ canopy.gateway.<instance>    (exclusive; decisions addresses the gateways that hold
                                          a group's members, learnt from their inputs)
    canopy.log      direct  log
        └─▶ canopy.store.events          (LogBatch messages from decisions: the event log)
        └─▶ canopy.monitor.<instance>.<id> (exclusive, bounded; while a store's live monitor
                                          has watchers)
    canopy.commands direct  timers
        └─▶ canopy.timers
    canopy.dead     fanout  └─▶ canopy.dead   (dead letters: kept by the store, deadletters.py)
    canopy.gateways fanout  └─▶ every canopy.gateway.<instance> (Resync requests)
    canopy.liveness fanout  └─▶ canopy.liveness.<instance> of every decisions worker
                                          (exclusive; GatewayAlive heartbeats)

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

Who declares what. Each service's RabbitMQ user may configure only its own names
(services/common/bus/access.py), so each exchange and durable queue has one declaring service
(`EXCHANGES`, `Topology.durable_queues`): a queue's consumer declares it, its dead-letter
argument, its binding and the exchange it binds it to; decisions, the hub, also declares the
fanouts whose queues come and go with their consumers (canopy.gateways, canopy.liveness).
`Topology(service=...)` declares that service's part, then waits, passively, for the
exchanges it uses and the queues it publishes into that others declare (a first start on an
empty broker): its own part first, so no two services wait on each other. `service=None`
(tests, tools, the admin user) declares everything, as every service did before.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from services.common.messages import new_id

log = logging.getLogger(__name__)

INPUTS = "canopy.inputs"
DEFAULT = ""  # the default exchange: routing key = queue name
COMMANDS = "canopy.commands"
# The event log's exchange and key (`LogBatch` messages, decisions → the store): not logging.
LOG = "canopy.log"
LOG_KEY = "log"
DEAD = "canopy.dead"
GATEWAYS = "canopy.gateways"
LIVENESS = "canopy.liveness"
STORE_QUEUE = "canopy.store.events"
TIMERS_QUEUE = "canopy.timers"
TIMERS_KEY = "timers"
# How the store's queue was bound to INPUTS before log batches (it unbinds it; see `declare`).
LEGACY_STORE_KEY = "shard.*.frame"
# Gateways announce themselves this often on LIVENESS; decisions takes a gateway silent for a
# few of these (its `gateway_liveness_timeout`) for dead.
HEARTBEAT_INTERVAL = 1.0

InputKind = Literal["frame", "presence", "timer", "batch"]
Service = Literal["gateway", "decisions", "store", "timers"]
ExchangeKind = Literal["topic", "direct", "fanout"]

# Each exchange: its type and the one service that declares it (see "Who declares what").
EXCHANGES: dict[str, tuple[ExchangeKind, Service]] = {
    INPUTS: ("topic", "decisions"),
    COMMANDS: ("direct", "timers"),
    LOG: ("direct", "store"),
    DEAD: ("fanout", "store"),
    GATEWAYS: ("fanout", "decisions"),
    LIVENESS: ("fanout", "decisions"),
}
# The exchanges each service publishes to or binds its own queues to.
USES: dict[Service, tuple[str, ...]] = {
    "gateway": (INPUTS, LIVENESS, GATEWAYS),
    "decisions": (INPUTS, LIVENESS, GATEWAYS, LOG, COMMANDS),
    "store": (LOG, DEAD),
    "timers": (INPUTS, COMMANDS),
}
# How long a service waits between two looks for what another declares.
WAIT_INTERVAL = 0.2


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
    # The service whose part `declare` declares (its broker user may configure no more); None:
    # all of it.
    service: Service | None = None

    def _owns(self, owner: Service) -> bool:
        return self.service is None or self.service == owner

    def durable_queues(self) -> dict[str, Service]:
        """Every durable queue and the service that consumes and declares it."""
        queues: dict[str, Service] = {shard_queue(i): "decisions" for i in range(self.shards)}
        return queues | {STORE_QUEUE: "store", TIMERS_QUEUE: "timers", DEAD: "store"}

    def publishes_into(self) -> list[str]:
        """The durable queues `service` publishes into with `mandatory` and does not declare:
        they must exist before it publishes (or its messages come back unroutable)."""
        shards = [shard_queue(i) for i in range(self.shards)]
        into: dict[Service, list[str]] = {
            "gateway": shards,
            "timers": shards,
            "decisions": [STORE_QUEUE, TIMERS_QUEUE],
            "store": [],
        }
        return [] if self.service is None else into[self.service]

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
        """Declare this service's part of the topology (all of it when `service` is None),
        wait for the rest it uses; the exchanges it uses, by name."""
        exchanges: dict[str, AbstractExchange] = {DEFAULT: channel.default_exchange}
        for name, (kind, owner) in EXCHANGES.items():
            if self._owns(owner):
                exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
        if self._owns("store"):
            dead = await channel.declare_queue(
                DEAD, durable=True, arguments={"x-queue-type": self.queue_type}
            )
            await dead.bind(exchanges[DEAD])
        shards = [shard_queue(i) for i in range(self.shards)] if self._owns("decisions") else []
        durable = [(name, self._durable_args(single_active=True)) for name in shards]
        durable += [(STORE_QUEUE, self._durable_args())] if self._owns("store") else []
        durable += [(TIMERS_QUEUE, self._durable_args())] if self._owns("timers") else []
        declared = dict(
            zip(
                [name for name, _ in durable],
                await self._durable_queues(channel, durable),
                strict=True,
            )
        )
        for index, name in enumerate(shards):
            await declared[name].bind(exchanges[INPUTS], routing_key=f"shard.{index}.*")
        if STORE_QUEUE in declared:
            store = declared[STORE_QUEUE]
            await store.bind(exchanges[LOG], routing_key=LOG_KEY)
            # Before log batches, the store read frames and broadcasts straight off these
            # exchanges; a broker kept from then (make run's) must stop copying them to it.
            # By name: the store does not declare canopy.inputs (an unbind from an exchange
            # that does not exist yet is no error).
            await store.unbind(INPUTS, routing_key=LEGACY_STORE_KEY)
        if TIMERS_QUEUE in declared:
            await declared[TIMERS_QUEUE].bind(exchanges[COMMANDS], routing_key=TIMERS_KEY)
        # Its own part first, then what others declare: so no two services wait on each other.
        uses = USES[self.service] if self.service is not None else ()
        others = [name for name in uses if name not in exchanges]
        await self._wait_for(channel, exchanges=others, queues=self.publishes_into())
        for name in others:
            exchanges[name] = await channel.declare_exchange(name, passive=True)
        return exchanges

    async def _wait_for(
        self, channel: AbstractChannel, *, exchanges: list[str], queues: list[str]
    ) -> None:
        """Until every named exchange and queue exists (declared by its own service; a first
        start on an empty broker), looked up passively on a probe channel, since RabbitMQ
        answers a lookup of a missing name by closing the channel."""
        pending = [("exchange", name) for name in exchanges] + [("queue", name) for name in queues]
        if not pending:
            return
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        probe: aiormq.abc.AbstractChannel | None = None
        waited = False
        try:
            while pending:
                kind, name = pending[0]
                if probe is None or probe.is_closed:
                    probe = await underlay.connection.channel(publisher_confirms=False)
                try:
                    if kind == "exchange":
                        await probe.exchange_declare(name, passive=True)
                    else:
                        await probe.queue_declare(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    if not waited:
                        log.warning(
                            "%s: waiting for the %s %s, which %s declares",
                            self.service,
                            kind,
                            name,
                            EXCHANGES[name][1]
                            if kind == "exchange"
                            else self.durable_queues()[name],
                        )
                        waited = True
                    await asyncio.sleep(WAIT_INTERVAL)
                    continue
                pending.pop(0)
        finally:
            if probe is not None and not probe.is_closed:
                await probe.close()

    def required_consumers(self) -> list[str]:
        """Queues that must have a consumer before the stack can serve a session."""
        return [shard_queue(i) for i in range(self.shards)] + [STORE_QUEUE, TIMERS_QUEUE]


async def declare_gateway_queue(channel: AbstractChannel, instance: str) -> AbstractQueue:
    """A gateway's own queue: what decisions addresses to it, and Resync requests."""
    queue = await channel.declare_queue(
        gateway_queue(instance),
        exclusive=True,
        auto_delete=True,
        arguments={"x-queue-type": "classic"},
    )
    await queue.bind(GATEWAYS)
    return queue


def liveness_queue(instance: str) -> str:
    return f"{LIVENESS}.{instance}"


async def declare_liveness_queue(channel: AbstractChannel, instance: str) -> AbstractQueue:
    """A decisions worker's own queue of gateway heartbeats (gone with its connection)."""
    queue = await channel.declare_queue(
        liveness_queue(instance),
        exclusive=True,
        auto_delete=True,
        arguments={"x-queue-type": "classic", "x-message-ttl": 10_000},
    )
    await queue.bind(LIVENESS)
    return queue


async def declare_monitor_queue(
    channel: AbstractChannel, instance: str, *, max_length: int
) -> AbstractQueue:
    """A live monitor's copy of the event log: its own name each time (a fresh id), since a
    store may stop and start watching on one connection; at most `max_length` messages, as a
    slow reader must not grow the broker's memory."""
    queue = await channel.declare_queue(
        f"canopy.monitor.{instance}.{new_id()[-8:]}",
        exclusive=True,
        auto_delete=True,
        arguments={"x-queue-type": "classic", "x-max-length": max_length},
    )
    await queue.bind(LOG, routing_key=LOG_KEY)
    return queue


async def dead_letter_queue(channel: AbstractChannel) -> AbstractQueue:
    """`canopy.dead`, as `Topology.declare` declared it (passive: a missing one is an error,
    not a queue declared with other arguments)."""
    return await channel.declare_queue(DEAD, passive=True)
