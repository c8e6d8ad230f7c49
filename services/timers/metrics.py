"""Prometheus metrics of the timers service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TimersMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ticks = Counter(
            "canopy_timers_ticks", "Ticks published, by event", ["event"], registry=self.registry
        )
        self.running = Gauge(
            "canopy_timers_periods_running",
            "Periods with ticks still to fire",
            registry=self.registry,
        )
        self.lateness = Histogram(
            "canopy_timers_lateness_seconds",
            "How late a tick was published after its deadline",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=self.registry,
        )
        self.rejected = Counter(
            "canopy_timers_malformed",
            "Malformed bus messages dead-lettered",
            registry=self.registry,
        )
        self.late = Counter(
            "canopy_timers_late_ticks",
            "Ticks published after a restart whose deadline passed while timers was down",
            registry=self.registry,
        )
        self.leader = Gauge(
            "canopy_timers_leader",
            "1 while this worker holds the timers lease and runs the schedules",
            registry=self.registry,
        )
