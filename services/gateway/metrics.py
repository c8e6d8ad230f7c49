"""Prometheus metrics of the gateway service (names and label rules: `services.common.metrics`).

The per-frame paths use children resolved once (`frame_outcome`, `ack`…): `.labels()` takes a
lock and builds a tuple on every call, too much for every frame of every participant.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import ErrorCode
from services.common.metrics import HOP_BUCKETS, LATENCY_BUCKETS, ServiceMetrics

UNPARSED = "-"  # the channel label of a frame refused before its channel was known
CONNECT_OUTCOMES = (
    "accepted",
    "foreign_origin",
    "unknown_participant",
    "broker_unavailable",
    "broker_blocked",
    "store_unreachable",
)


class GatewayMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("gateway")
        registry = self.registry
        self.connections = Gauge(
            "canopy_gateway_connections", "Open participant connections", registry=registry
        )
        self.connects = Counter(
            "canopy_gateway_connects",
            "Connection attempts, by outcome: accepted, or the refusal's reason "
            "(foreign_origin, unknown_participant, broker_unavailable, broker_blocked, "
            "store_unreachable)",
            ["outcome"],
            registry=registry,
        )
        self.disconnects = Counter(
            "canopy_gateway_disconnects",
            "Accepted connections that ended (the browser left, or the gateway closed them)",
            registry=registry,
        )
        self.replacements = Counter(
            "canopy_gateway_replacements",
            "Connections closed because their participant connected again (4409)",
            registry=registry,
        )
        self.frames_in = Counter(
            "canopy_gateway_frames_in",
            "Inbound frames, by channel (- when refused before it was known) and outcome "
            "(accepted, duplicate, or the error code)",
            ["channel", "outcome"],
            registry=registry,
        )
        self.acks = Counter(
            "canopy_gateway_acks", "Acks sent (accepted and duplicate frames)", registry=registry
        )
        self.confirm_seconds = Histogram(
            "canopy_gateway_confirm_seconds",
            "Publish until broker confirm of an inbound frame",
            buckets=HOP_BUCKETS,
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "canopy_gateway_delivery_seconds",
            "From the gateway's receipt of a frame to a group broadcast it caused being "
            "written to a member's socket (one observation per member)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bus_failures = Counter(
            "canopy_gateway_bus_failures",
            "Bus messages (or one delivery of one) the gateway could not handle: dropped, "
            "and the consumer goes on",
            registry=registry,
        )
        self.broadcasts = Counter(
            "canopy_gateway_broadcasts", "Broadcasts received from the bus", registry=registry
        )
        self.frames_out = Counter(
            "canopy_gateway_frames_out",
            "Server frames queued to browsers",
            registry=registry,
        )
        self.groups = Gauge(
            "canopy_gateway_groups",
            "Groups with at least one member connected here",
            registry=registry,
        )
        self.outbox_frames = Gauge(
            "canopy_gateway_outbox_frames",
            "Frames waiting in send queues to browsers, over every connection",
            registry=registry,
        )
        self.outbox_frames_max = Gauge(
            "canopy_gateway_outbox_frames_max",
            "The longest send queue to one browser",
            registry=registry,
        )
        self.batch_items = Histogram(
            "canopy_gateway_batch_items",
            "Inputs (frames, presence) per message published to a shard queue",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.slow_clients = Counter(
            "canopy_gateway_slow_clients",
            "Connections closed because their outbox overflowed",
            registry=registry,
        )
        self.inbox_full = Counter(
            "canopy_gateway_inbox_full",
            "Times the gateway stopped reading a browser's socket because its frames not yet "
            "published filled the connection's inbox (CANOPY_INBOX_BYTES)",
            registry=registry,
        )
        # Every series a dashboard or an alert reads exists from the start (at 0).
        for outcome in CONNECT_OUTCOMES:
            self.connects.labels(outcome)
        self._frame_children: dict[tuple[str, str], Counter] = {}
        for code in ErrorCode:
            self.frame_outcome(UNPARSED, code.value)

    def frame_outcome(self, channel: str, outcome: str) -> Counter:
        """The `frames_in` child of (channel, outcome); channels are an experiment's own."""
        key = (channel, outcome)
        child = self._frame_children.get(key)
        if child is None:
            child = self._frame_children[key] = self.frames_in.labels(channel, outcome)
        return child
