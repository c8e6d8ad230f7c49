"""Prometheus metrics of the decisions service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DecisionsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.inputs = Counter(
            "canopy_decisions_inputs", "Inputs handled, by type", ["type"], registry=self.registry
        )
        self.outputs = Counter(
            "canopy_decisions_outputs",
            "Frames published, by channel",
            ["channel"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "canopy_decisions_malformed",
            "Malformed bus messages dead-lettered",
            registry=self.registry,
        )
        self.groups = Gauge(
            "canopy_decisions_groups",
            "Groups whose state this worker holds",
            registry=self.registry,
        )
        self.batch_items = Histogram(
            "canopy_decisions_batch_items",
            "Frames per message published to a gateway",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.handle_seconds = Histogram(
            "canopy_decisions_handle_seconds",
            "Time to handle one input, publishing included",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.rebuilds = Counter(
            "canopy_decisions_rebuilds",
            "Groups rebuilt from a non-empty event log (after a restart or a shard move)",
            registry=self.registry,
        )
        self.rebuild_seconds = Histogram(
            "canopy_decisions_rebuild_seconds",
            "Time to read back and fold one group's log",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.gateways_lost = Counter(
            "canopy_decisions_gateways_lost",
            "Gateways whose heartbeats stopped (their participants were disconnected)",
            registry=self.registry,
        )
