"""Prometheus metrics of the store service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "canopy_store_events",
            "Events written to the log, by direction",
            ["direction"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "canopy_store_duplicates",
            "Events already in the log, dropped",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "canopy_store_batch_size",
            "Events per batch write",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "canopy_store_batch_seconds",
            "Time to write one batch to MongoDB",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.failures = Counter(
            "canopy_store_batch_failures",
            "Batches MongoDB refused (requeued)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "canopy_store_malformed",
            "Malformed bus messages dead-lettered",
            registry=self.registry,
        )
        self.sessions = Counter(
            "canopy_store_sessions_created", "Sessions created", registry=self.registry
        )
