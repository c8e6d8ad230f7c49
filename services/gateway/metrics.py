"""Prometheus metrics of the gateway service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "canopy_gateway_connections", "Open participant connections", registry=self.registry
        )
        self.connects = Counter(
            "canopy_gateway_connects",
            "Connection attempts, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.frames = Counter(
            "canopy_gateway_frames",
            "Inbound frames, by outcome (accepted, duplicate, error code)",
            ["outcome"],
            registry=self.registry,
        )
        self.confirm_seconds = Histogram(
            "canopy_gateway_confirm_seconds",
            "Publish until broker confirm of an inbound frame",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.broadcasts = Counter(
            "canopy_gateway_broadcasts", "Broadcasts received from the bus", registry=self.registry
        )
        self.frames_out = Counter(
            "canopy_gateway_frames_out",
            "Server frames queued to browsers",
            registry=self.registry,
        )
        self.groups = Gauge(
            "canopy_gateway_groups",
            "Groups with at least one member connected here",
            registry=self.registry,
        )
        self.batch_items = Histogram(
            "canopy_gateway_batch_items",
            "Inputs (frames, presence) per message published to a shard queue",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.slow_clients = Counter(
            "canopy_gateway_slow_clients",
            "Connections closed because their outbox overflowed",
            registry=self.registry,
        )
