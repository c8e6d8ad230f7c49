"""Prometheus metrics of the timers service (names and label rules: `services.common.metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import ServiceMetrics


class TimersMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("timers")
        registry = self.registry
        self.ticks = Counter(
            "canopy_timers_ticks", "Ticks published, by event", ["event"], registry=registry
        )
        for event in ("period_start", "subperiod", "period_end"):
            self.ticks.labels(event)
        self.periods_running = Gauge(
            "canopy_timers_periods_running",
            "Periods with ticks still to fire",
            registry=registry,
        )
        self.tick_drift_seconds = Histogram(
            "canopy_timers_tick_drift_seconds",
            "A tick's publish time minus its scheduled time (late ticks after a restart are "
            "counted in late_ticks instead)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.malformed = Counter(
            "canopy_timers_malformed",
            "Malformed bus messages dead-lettered",
            registry=registry,
        )
        self.late_ticks = Counter(
            "canopy_timers_late_ticks",
            "Ticks published after a restart whose deadline passed while timers was down",
            registry=registry,
        )
        self.leader = Gauge(
            "canopy_timers_leader",
            "1 while this worker holds the timers lease and runs the schedules",
            registry=registry,
        )
