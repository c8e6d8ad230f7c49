"""The bus: one RabbitMQ topology for every service, publishing with confirms, ordered consumers.

All inputs of one group share one shard queue, so the group's state machine sees one total order.
Publishing uses publisher confirms and `mandatory`, so a message is either in a queue or the
publisher gets an exception; nothing vanishes silently.

One idea per module, all of it importable from here as before:

- `topology`: the exchanges and queues, their names and arguments, every declaration (the
  durable ones in `Topology.declare`, the per-instance ones beside it); dead letters, queue by
  queue.
- `connection`: `Bus`, the robust connection with failover across the broker's nodes and the
  confirming publish channel.
- `wire`: a message's body, one envelope or a batch of them.
- `batcher`: the `Batcher`, group commit of envelopes per destination.
- `consume`: the consumer loops, ordered and pipelined, and how a delivery is settled.
"""

from services.common.bus.batcher import Batcher
from services.common.bus.connection import RECONNECT_INTERVAL, Bus, Properties
from services.common.bus.consume import (
    ConsumerHalted,
    Handler,
    Pipelined,
    completed,
    consume_in_order,
    consume_pipelined,
    running,
)
from services.common.bus.topology import (
    COMMANDS,
    DEAD,
    DEFAULT,
    DELIVERY_LIMIT,
    GATEWAYS,
    HEARTBEAT_INTERVAL,
    INPUTS,
    LEGACY_DELIVERY_LIMIT,
    LIVENESS,
    LOG,
    LOG_KEY,
    STORE_QUEUE,
    TIMERS_KEY,
    TIMERS_QUEUE,
    InputKind,
    Topology,
    dead_letter_queue,
    declare_gateway_queue,
    declare_liveness_queue,
    declare_monitor_queue,
    gateway_queue,
    input_key,
    liveness_queue,
    shard_of,
    shard_queue,
)
from services.common.bus.wire import (
    _ENVELOPES,
    BATCH_MAX_BYTES,
    BATCH_TYPE,
    batch_body,
    decode_message,
    encode_batch,
)

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_TYPE",
    "COMMANDS",
    "DEAD",
    "DEFAULT",
    "DELIVERY_LIMIT",
    "GATEWAYS",
    "HEARTBEAT_INTERVAL",
    "INPUTS",
    "LEGACY_DELIVERY_LIMIT",
    "LIVENESS",
    "LOG",
    "LOG_KEY",
    "RECONNECT_INTERVAL",
    "STORE_QUEUE",
    "TIMERS_KEY",
    "TIMERS_QUEUE",
    "_ENVELOPES",
    "Batcher",
    "Bus",
    "ConsumerHalted",
    "Handler",
    "InputKind",
    "Pipelined",
    "Properties",
    "Topology",
    "batch_body",
    "completed",
    "consume_in_order",
    "consume_pipelined",
    "dead_letter_queue",
    "declare_gateway_queue",
    "declare_liveness_queue",
    "declare_monitor_queue",
    "decode_message",
    "encode_batch",
    "gateway_queue",
    "input_key",
    "liveness_queue",
    "running",
    "shard_of",
    "shard_queue",
]
