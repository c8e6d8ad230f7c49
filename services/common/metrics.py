"""Metrics every service has, and the rules all of Canopy's metrics follow.

Names: `canopy_<service>_<what>_<unit>`; counters end in `_total` (prometheus-client adds it),
durations are in seconds. Labels take bounded values only (an outcome, an error code, a
channel of a known experiment), never a participant code, a session or a group id.
In code, a metric's attribute is its name without `canopy_<service>_` and `_total`
(`StoreMetrics.batch_failures` is `canopy_store_batch_failures_total`); the names are public
(dashboards, alerts), so when the two differ the attribute is what changes.

Owns `ServiceMetrics`, the base of each service's metrics class: its registry, with
`canopy_<service>_build_info` (version, Python), `canopy_<service>_ready` (the last `/readyz`
answer), `canopy_<service>_bus_reconnects_total`, `canopy_<service>_bus_blocked` (a resource
alarm on the broker blocks its connection) and the process collector (CPU, memory, open
files: `process_*`). Also the latency buckets shared by the histograms that alerts read.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, ProcessCollector

# End-to-end and delivery latencies (ISSUE 10: 1, 2, 5, 10, 25, 50, 100, 250 ms …): the
# alert's 100 ms target is a bucket boundary, so histogram_quantile is exact around it.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Single hops on the loopback (a broker confirm, one input's handling).
HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _version() -> str:
    try:
        return metadata.version("canopy")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.build = Info(
            f"canopy_{service}_build",
            "Version of the running code (CANOPY_REVISION: the image's commit, when set)",
            registry=self.registry,
        )
        self.build.info(
            {
                "version": _version(),
                "revision": os.environ.get("CANOPY_REVISION", ""),
                "python": platform.python_version(),
            }
        )
        self.ready = Gauge(
            f"canopy_{service}_ready",
            "1 when the last /readyz answered ready, 0 when it did not",
            registry=self.registry,
        )
        self.bus_reconnects = Counter(
            f"canopy_{service}_bus_reconnects",
            "Times the RabbitMQ connection came back after it dropped",
            registry=self.registry,
        )
        self.bus_blocked = Gauge(
            f"canopy_{service}_bus_blocked",
            "1 while RabbitMQ blocks the service's connection (a memory or disk alarm)",
            registry=self.registry,
        )
