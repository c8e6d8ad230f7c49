"""Prometheus metrics of the store service (names and label rules: `services.common.metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import ServiceMetrics


class StoreMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("store")
        registry = self.registry
        self.events = Counter(
            "canopy_store_events",
            "Events written to the log, by direction",
            ["direction"],
            registry=registry,
        )
        self.duplicates = Counter(
            "canopy_store_duplicates",
            "Events already in the log, dropped",
            registry=registry,
        )
        self.batch_size = Histogram(
            "canopy_store_batch_size",
            "Events per batch write",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "canopy_store_batch_seconds",
            "Time to write one batch to MongoDB",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "canopy_store_lag_seconds",
            "Age of the oldest event received but not written yet (0: all written)",
            registry=registry,
        )
        self.batch_failures = Counter(
            "canopy_store_batch_failures",
            "Batches MongoDB refused (requeued)",
            registry=registry,
        )
        self.quarantined = Counter(
            "canopy_store_quarantined",
            "Events the log cannot hold (poison), set aside in the quarantine collection, "
            "by reason: too_large (over MongoDB's 16 MiB), invalid (refused by the server)",
            ["reason"],
            registry=registry,
        )
        for reason in ("too_large", "invalid"):
            self.quarantined.labels(reason)
        self.malformed = Counter(
            "canopy_store_malformed",
            "Malformed bus messages dead-lettered",
            registry=registry,
        )
        self.sessions_created = Counter(
            "canopy_store_sessions_created", "Sessions created", registry=registry
        )
        self.exports = Counter(
            "canopy_store_exports",
            "Event exports served, by format",
            ["format"],
            registry=registry,
        )
        for export_format in ("csv", "jsonl"):
            self.exports.labels(export_format)
        self.events_in = self.events.labels("in")
        self.events_out = self.events.labels("out")
