"""An in-memory bus, store and timers repository for the workers' unit tests: no broker, no
MongoDB, a group's whole life in a second.

`MemoryBus` is a `services.common.ports.Publisher` with the delivery semantics the workers rely
on, as RabbitMQ gives them (services/common/bus/topology.py):
- every message goes through its bytes (`Envelope.encode`, a batch's JSON array), so a reader
  gets JSON, as over the wire, and a payload that does not serialize fails its publish;
- routing: the default exchange by queue name, `canopy.inputs` by topic (`shard.N.*`), the
  commands and log exchanges by key, `canopy.gateways` fanout; an unroutable `mandatory`
  publish raises, a non-mandatory one is dropped (a gateway that went away);
- confirms: a publish returns once its queue holds it; `hold(exchange)` keeps the confirms of
  an exchange's publishes until `release(exchange)` (a broker slow to sync its disk);
- queues (`MemoryQueue`) deliver in order to one consumer at a time (single active consumer),
  at most `prefetch` unacknowledged; messages given back are `redelivered` before any other,
  as a quorum queue does it: in the order they came back (`nack(requeue=True)` one by one),
  and a consumer's channel closing (`close_channel`: a crashed worker, a shard handed over)
  gives back what it had not acknowledged in the order it was delivered; `reject` sends
  them to `dead`.

A `MemoryQueue` has the part of aio-pika's queue that `consume_pipelined` / `consume_in_order`
use (`name`, `consume(callback)` and `cancel(tag)`; deliveries with `body`, `type`,
`message_id`, `ack`, `nack`, `reject`), so the tests run the services' real consumer loops.

`FakeStore` is the store's side of the log: it receives each log batch (from its bytes) and
writes it while `writing` (a lagging store otherwise); `FakeDirectory` answers a group's
configuration and log from what it wrote, as the store's internal API does.
`MemoryTimersRepository` keeps the timers' schedules in a dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from services.common.bus import (
    BATCH_TYPE,
    COMMANDS,
    DEFAULT,
    INPUTS,
    LOG,
    LOG_KEY,
    STORE_QUEUE,
    TIMERS_KEY,
    TIMERS_QUEUE,
    Topology,
    batch_body,
    encode_batch,
    shard_queue,
)
from services.common.directory import GroupConfig, NotFound
from services.common.lobby import LobbyConfig
from services.common.messages import Envelope, LogBatch, new_id

_ENVELOPES: TypeAdapter[list[Envelope]] = TypeAdapter(list[Envelope])


class Unroutable(Exception):
    """A mandatory publish no queue takes (the broker's basic.return)."""


def decode(body: bytes, message_type: str | None) -> list[Envelope]:
    """The envelopes of a message body, as `services.common.bus.decode_message` reads them."""
    if message_type == BATCH_TYPE:
        return _ENVELOPES.validate_json(body)
    return [Envelope.decode(body)]


@dataclass
class Message:
    tag: int  # its place in its queue: a requeued message goes back there
    body: bytes
    type: str | None
    message_id: str
    redelivered: bool = False


@dataclass
class Delivery:
    """One delivery to a consumer (aio-pika's `AbstractIncomingMessage`, what is used of it)."""

    message: Message
    queue: MemoryQueue

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def type(self) -> str | None:
        return self.message.type

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def redelivered(self) -> bool:
        return self.message.redelivered

    async def ack(self, multiple: bool = False) -> None:
        self.queue.ack_frames += 1
        if not multiple:
            self.queue._settle(self.message, requeue=None)
            return
        # With every delivery before it (the channel's order: `unacked` keeps it).
        if self.message.tag not in self.queue.unacked:
            raise RuntimeError(f"{self.queue.name}: delivery {self.message.tag} settled twice")
        for message in list(self.queue.unacked.values()):
            self.queue._settle(message, requeue=None)
            if message is self.message:
                break

    async def nack(self, requeue: bool = True) -> None:
        self.queue._settle(self.message, requeue=requeue)

    async def reject(self, requeue: bool = False) -> None:
        self.queue._settle(self.message, requeue=requeue)


class MemoryQueue:
    def __init__(self, name: str, *, prefetch: int = 100) -> None:
        self.name = name
        self.prefetch = prefetch
        self.waiting: list[Message] = []  # published, never delivered, in queue order
        self.returns: list[Message] = []  # given back, delivered first, in the order they came
        self.unacked: dict[int, Message] = {}
        self.dead: list[Message] = []
        self.acked = 0
        self.ack_frames = 0  # basic.ack frames (one with `multiple` settles several)
        self.deliveries = 0
        self.delivered: list[Message] = []  # every delivery, in order (redeliveries again)
        self._tags = 0
        self._changed = asyncio.Event()  # set (and replaced) on every change
        self._consumer: asyncio.Task[None] | None = None
        self._consumer_tag = ""

    @property
    def ready(self) -> list[Message]:
        """What the queue delivers next, in that order."""
        return [*self.returns, *self.waiting]

    def put(self, body: bytes, message_type: str | None, message_id: str) -> None:
        self._tags += 1
        self.waiting.append(Message(self._tags, body, message_type, message_id))
        self._notify()

    async def consume(self, callback: Callable[[Delivery], Awaitable[Any]]) -> str:
        assert self._consumer is None, f"{self.name}: a second consumer (single active)"
        self._tags += 1
        self._consumer_tag = f"ctag.{self._tags}"
        self._consumer = asyncio.create_task(self._deliver(callback))
        return self._consumer_tag

    async def cancel(self, tag: str) -> None:
        """The consumer is cancelled; what it was delivered stays its to acknowledge."""
        if self._consumer is not None and tag == self._consumer_tag:
            self._consumer.cancel()
            self._consumer = None
            self._notify()

    async def _deliver(self, callback: Callable[[Delivery], Awaitable[Any]]) -> None:
        while True:
            await self.wait_for(
                lambda: (self.returns or self.waiting) and len(self.unacked) < self.prefetch
            )
            message = (self.returns or self.waiting).pop(0)
            self.unacked[message.tag] = message
            self.deliveries += 1
            self.delivered.append(message)
            await callback(Delivery(message, self))

    def close_channel(self) -> None:
        """The consumer's channel closed (its worker crashed, or it handed the queue over):
        what it had not acknowledged comes back, in the order it was delivered."""
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        for tag in sorted(self.unacked):
            message = self.unacked[tag]
            message.redelivered = True
            self.returns.append(message)
        self.unacked.clear()
        self._notify()

    @property
    def idle(self) -> bool:
        """Nothing waits in it and nothing delivered waits for its acknowledgement."""
        return not self.returns and not self.waiting and not self.unacked

    async def settled(self, timeout: float = 5.0) -> None:
        """Until the queue is idle."""
        await asyncio.wait_for(self.wait_for(lambda: self.idle), timeout)

    async def wait_for(self, condition: Callable[[], object]) -> None:
        while not condition():
            await self._changed.wait()

    def envelopes(self) -> list[Envelope]:
        """Take every message waiting (as a consumer that acknowledges each at once)."""
        taken = self.ready
        self.returns, self.waiting = [], []
        self.acked += len(taken)
        self._notify()
        return [e for m in taken for e in decode(m.body, m.type)]

    def _settle(self, message: Message, *, requeue: bool | None) -> None:
        if self.unacked.pop(message.tag, None) is None:
            raise RuntimeError(f"{self.name}: delivery {message.tag} settled twice")
        if requeue is None:
            self.acked += 1
        elif requeue:
            message.redelivered = True
            self.returns.append(message)
        else:
            self.dead.append(message)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class MemoryChannel:
    """What the timers worker asks of a channel: its queue, declared passively."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    async def declare_queue(self, name: str, *, passive: bool = False) -> MemoryQueue:
        return self.bus.queues[name] if passive else self.bus.declare(name)


# A destination: a queue, or a function that takes each message's body (the store's log).
Sink = Callable[[bytes], None]


@dataclass
class _Binding:
    exchange: str
    pattern: str  # a routing key, with `*` for one word (topic); "" on a fanout exchange
    queue: MemoryQueue | None = None
    sink: Sink | None = None


def _matches(pattern: str, key: str) -> bool:
    words, keys = pattern.split("."), key.split(".")
    return len(words) == len(keys) and all(w in ("*", k) for w, k in zip(words, keys, strict=True))


@dataclass
class MemoryBus:
    """The bus of one test: Canopy's topology (shard queues, timers, the log to `store`)."""

    store: FakeStore | None = None
    shards: int = 4
    is_connected: bool = True
    blocked: bool = False
    queues: dict[str, MemoryQueue] = field(default_factory=dict)
    # Every envelope sent in a batch (to the gateways), as a gateway decodes it.
    sent: list[Envelope] = field(default_factory=list)
    _bindings: list[_Binding] = field(default_factory=list)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topology = Topology(self.shards, "quorum")
        for index in range(self.shards):
            self.bind(INPUTS, f"shard.{index}.*", self.declare(shard_queue(index)))
        self.bind(COMMANDS, TIMERS_KEY, self.declare(TIMERS_QUEUE))
        store = self.store
        if store is not None:
            self.bind(LOG, LOG_KEY, sink=lambda body: store.receive(LogBatch.decode(body)))
        else:
            self.bind(LOG, LOG_KEY, self.declare(STORE_QUEUE))

    def declare(self, name: str, *, prefetch: int = 100) -> MemoryQueue:
        """A queue (the default exchange reaches it by its name)."""
        return self.queues.setdefault(name, MemoryQueue(name, prefetch=prefetch))

    def bind(
        self,
        exchange: str,
        pattern: str,
        queue: MemoryQueue | None = None,
        *,
        sink: Sink | None = None,
    ) -> None:
        self._bindings.append(_Binding(exchange, pattern, queue, sink))

    def channel(self) -> MemoryChannel:
        return MemoryChannel(self)

    def hold(self, exchange: str) -> None:
        """Keep the confirms of publishes to `exchange` until `release`."""
        self._held.setdefault(exchange, asyncio.Event())

    def release(self, exchange: str) -> None:
        held = self._held.pop(exchange, None)
        if held is not None:
            held.set()

    # -- services.common.ports.Publisher ----------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        await self._publish(exchange, routing_key, envelope.encode(), None, envelope.id, mandatory)

    async def publish_reliably(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        await self.publish(exchange, routing_key, envelope, mandatory=mandatory)

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
        body = encode_batch(envelopes) if encoded is None else batch_body(encoded)
        self.sent.extend(decode(body, BATCH_TYPE))
        await self._publish(exchange, routing_key, body, BATCH_TYPE, new_id(), mandatory)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_type: str | None,
        message_id: str,
        mandatory: bool,
    ) -> None:
        held = self._held.get(exchange)
        if held is not None:  # sent, its confirm not back yet
            await held.wait()
        routed = False
        if exchange == DEFAULT:
            queue = self.queues.get(routing_key)
            if queue is not None:
                queue.put(body, message_type, message_id)
                routed = True
        for binding in self._bindings:
            if binding.exchange != exchange:
                continue
            if binding.pattern and not _matches(binding.pattern, routing_key):
                continue
            if binding.queue is not None:
                binding.queue.put(body, message_type, message_id)
            if binding.sink is not None:
                binding.sink(body)
            routed = True
        if not routed and mandatory:
            raise Unroutable(f"{exchange or 'default'} → {routing_key}")


class FakeStore:
    """The log queue and what the store wrote of it; writes only while `writing`."""

    def __init__(self) -> None:
        self.queue: list[LogBatch] = []
        self.rows: list[dict[str, Any]] = []
        self.barriers: set[str] = set()
        self.writing = True
        self.barrier_sent = asyncio.Event()

    def receive(self, batch: LogBatch) -> None:
        self.queue.append(batch)
        if batch.barrier is not None:
            self.barrier_sent.set()
        if self.writing:
            self.write()

    def write(self) -> None:
        for batch in self.queue:
            for record in batch.records:
                self.rows.append(
                    {
                        "ts": record.ts,
                        "participant": record.participant,
                        "direction": record.direction,
                        "channel": record.channel,
                        "seq": record.seq,
                        "value": record.value,
                    }
                )
            if batch.barrier is not None:
                self.barriers.add(batch.barrier)
        self.queue.clear()


class FakeDirectory:
    """The store's internal API for one group, over what `store` wrote."""

    def __init__(self, store: FakeStore, config: GroupConfig) -> None:
        self.store = store
        self.config = config
        self.forgotten: list[str] = []
        self.forgot = asyncio.Event()  # set when the worker drops a group

    async def group(self, group: str) -> GroupConfig:
        if group != self.config.group:
            raise NotFound(group)
        return self.config

    async def group_fresh(self, group: str) -> GroupConfig:
        return await self.group(group)

    async def group_log(self, group: str) -> list[dict[str, Any]]:
        return sorted(self.store.rows, key=lambda row: float(row["ts"]))

    async def barrier_passed(self, barrier: str) -> bool:
        return barrier in self.store.barriers

    def forget_group(self, group: str) -> None:
        self.forgotten.append(group)
        self.forgot.set()

    async def lobby(self, session: str) -> LobbyConfig:
        raise NotFound(session)  # a session whose groups are set up front has no lobby

    async def lobby_log(self, session: str) -> list[dict[str, Any]]:
        raise NotFound(session)

    async def form_group(
        self, session: str, group: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]]:
        raise NotFound(group)


class MemoryTimersRepository:
    """The timers' schedules in a dict (services/timers/repository.py without MongoDB)."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}
        self.recorded = asyncio.Event()  # set on each `record_fired`

    async def acquire_lease(self, owner: str, *, now: float, ttl: float) -> bool:
        return True

    async def release_lease(self, owner: str) -> None:
        pass

    async def pending(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self.documents.values() if not d["done"] and not d.get("paused")]

    async def claim(
        self,
        *,
        session: str,
        group: str,
        period: int,
        length: float,
        num_subperiods: int,
        now: float,
    ) -> dict[str, Any]:
        key = f"{group}:{period}"
        document = self.documents.setdefault(
            key,
            {
                "_id": key,
                "session": session,
                "group": group,
                "period": period,
                "starts_at": now,
                "length": length,
                "num_subperiods": num_subperiods,
                "fired": 0,
                "done": False,
            },
        )
        return dict(document)

    async def record_fired(self, schedule_id: str, fired: int, *, done: bool) -> None:
        document = self.documents[schedule_id]
        if document["fired"] < fired:
            document.update(fired=fired, done=done)
        self.recorded.set()
