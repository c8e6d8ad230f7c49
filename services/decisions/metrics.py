"""Prometheus metrics of the decisions service (names and label rules: `services.common.metrics`).

Children of labelled metrics are resolved once and kept (`applied`, `rejection`, `broadcast`):
the worker's loop is measured per decision (`make bench`), and `.labels()` costs a lock and a
tuple per call.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import ErrorCode
from services.common.messages import Channel, MessageType
from services.common.metrics import HOP_BUCKETS, LATENCY_BUCKETS, ServiceMetrics

DUPLICATE = "duplicate"  # a frame already applied (resent after a reconnect), or not a member's


class DecisionsMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("decisions")
        registry = self.registry
        self.inputs = Counter(
            "canopy_decisions_inputs", "Inputs handled, by type", ["type"], registry=registry
        )
        self.frames = Counter(
            "canopy_decisions_frames",
            "Participant frames, by outcome: applied, or rejected with a reason (an error "
            "code, or duplicate)",
            ["outcome"],
            registry=registry,
        )
        self.coalesced = Counter(
            "canopy_decisions_coalesced",
            "Applied decisions whose broadcast the rate limit folded into a later one",
            registry=registry,
        )
        self.broadcasts = Counter(
            "canopy_decisions_broadcasts",
            "Server frames published to gateways, by channel",
            ["channel"],
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "canopy_decisions_end_to_end_seconds",
            "From a frame's receipt at its gateway to the publish of the group broadcast it "
            "caused (one observation per such broadcast)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_halts = Counter(
            "canopy_decisions_consumer_halts",
            "Shard consumers stopped by an input that failed (restarted in order after a pause)",
            registry=registry,
        )
        self.malformed = Counter(
            "canopy_decisions_malformed",
            "Malformed bus messages dead-lettered",
            registry=registry,
        )
        self.groups = Gauge(
            "canopy_decisions_groups",
            "Groups whose state this worker holds",
            registry=registry,
        )
        self.groups_evicted = Counter(
            "canopy_decisions_groups_evicted",
            "Groups whose state was dropped after their last period ended and every member "
            "left (rebuilt from the log if an input for them comes after all)",
            registry=registry,
        )
        self.batch_items = Histogram(
            "canopy_decisions_batch_items",
            "Frames per message published to a gateway",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.handle_seconds = Histogram(
            "canopy_decisions_handle_seconds",
            "Time to handle one input, publishing included",
            buckets=HOP_BUCKETS,
            registry=registry,
        )
        self.rebuilds = Counter(
            "canopy_decisions_rebuilds",
            "Groups rebuilt from a non-empty event log (after a restart or a shard move)",
            registry=registry,
        )
        self.rebuild_seconds = Histogram(
            "canopy_decisions_rebuild_seconds",
            "Time to read back and fold one group's log",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.gateways_lost = Counter(
            "canopy_decisions_gateways_lost",
            "Gateways whose heartbeats stopped (their participants were disconnected)",
            registry=registry,
        )
        # Resolved once: the per-input paths only index these.
        self.input = {kind: self.inputs.labels(kind.value) for kind in MessageType}
        self.applied = self.frames.labels("applied")
        self.rejections = {code.value: self.frames.labels(code.value) for code in ErrorCode}
        self.duplicate = self.frames.labels(DUPLICATE)
        self._broadcast_children: dict[str, Counter] = {}
        for channel in Channel:  # the contract's channels exist from the start (at 0)
            self.broadcast(channel.value)

    def broadcast(self, channel: str) -> Counter:
        """The `broadcasts` child of a channel (the contract's, or an experiment's own)."""
        child = self._broadcast_children.get(channel)
        if child is None:
            child = self._broadcast_children[channel] = self.broadcasts.labels(channel)
        return child

    def rejection(self, code: str) -> Counter:
        child = self.rejections.get(code)
        if child is None:  # an experiment's own code: still one of a fixed few
            child = self.rejections[code] = self.frames.labels(code)
        return child
