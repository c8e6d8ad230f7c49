"""A service whose RabbitMQ connection the broker blocks (a memory or disk alarm) is not ready,
and says so at once: `/readyz` answers 503 naming the alarm without asking the service's own
check (whose broker round trips would wait on the blocked connection until the alarm
clears), and `canopy_<service>_bus_blocked` is 1 (issue 23, "Backpressure"). The real
alarm, against a real node: tests/integration/test_bus_blocked.py and
tests/faults/test_backpressure.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from services.common import health
from services.common.metrics import ServiceMetrics
from tests.monitoring.conftest import parse


@dataclass
class FakeBus:
    """The two things readiness reads of `services.common.bus.Bus`."""

    blocked_reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_reason is not None


async def test_a_blocked_bus_makes_the_service_unready_without_asking_its_check() -> None:
    metrics = ServiceMetrics("probe")
    bus = FakeBus()
    asked = 0
    answered = asyncio.Event()
    answered.set()

    async def readiness() -> list[str]:
        nonlocal asked
        asked += 1
        await answered.wait()  # as the broker's answer on a blocked connection: not until it clears
        return []

    app = FastAPI()
    app.include_router(
        health.health_router(
            metrics.registry, readiness, metrics.ready, bus=bus, blocked=metrics.bus_blocked
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        response = await client.get("/readyz")
        assert response.status_code == 200 and asked == 1
        assert parse((await client.get("/metrics")).text).value("canopy_probe_bus_blocked") == 0

        bus.blocked_reason = "memory"
        answered.clear()
        async with asyncio.timeout(2.0):
            response = await client.get("/readyz")
            scraped = parse((await client.get("/metrics")).text)
        assert response.status_code == 503
        assert response.json()["problems"] == ["RabbitMQ blocks publishers (memory)"]
        assert asked == 1  # not asked while blocked
        assert scraped.value("canopy_probe_bus_blocked") == 1
        assert scraped.value("canopy_probe_ready") == 0

        bus.blocked_reason = None
        answered.set()
        response = await client.get("/readyz")
        assert response.status_code == 200 and asked == 2
        assert parse((await client.get("/metrics")).text).value("canopy_probe_bus_blocked") == 0
