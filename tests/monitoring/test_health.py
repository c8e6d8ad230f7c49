"""`canopy_<service>_ready` follows readiness whoever probes: `/readyz` sets it, and `/metrics`
checks again when the last check is older than READY_MAX_AGE (the app is the real router; the
readiness check is a stand-in)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from services.common import health
from services.common.metrics import ServiceMetrics
from tests.monitoring.conftest import parse


async def test_scrapes_refresh_the_readiness_gauge(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = ServiceMetrics("probe")
    problems = ["not connected to RabbitMQ"]

    async def readiness() -> list[str]:
        return list(problems)

    app = FastAPI()
    app.include_router(health.health_router(metrics.registry, readiness, metrics.ready))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:

        async def ready() -> float:
            return parse((await client.get("/metrics")).text).value("canopy_probe_ready")

        assert await ready() == 0  # checked by the scrape itself: nobody called /readyz
        problems.clear()
        assert await ready() == 0  # checked a moment ago: the answer is kept
        monkeypatch.setattr(health, "READY_MAX_AGE", 0.0)
        assert await ready() == 1
        problems.append("MongoDB unreachable")
        monkeypatch.setattr(health, "READY_MAX_AGE", 3600.0)
        assert (await client.get("/readyz")).status_code == 503
        assert await ready() == 0  # /readyz updated it
