"""A readiness check that hangs (MongoDB stopped answering: the store's check pings it) does
not hang `/metrics`: the scrape answers within READY_WAIT with `canopy_<service>_ready` 0, and
the gauge follows the check once it answers. Before, the scrape waited for the check, so
Prometheus (10 s scrape timeout) lost every metric of the store during a database outage,
the lag that CanopyStoreLagGrowing watches too (tests/faults/test_db_outage.py)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from services.common import health
from services.common.metrics import ServiceMetrics
from tests.monitoring.conftest import parse


async def test_a_hung_readiness_check_does_not_hang_the_scrape() -> None:
    metrics = ServiceMetrics("probe")
    answered = asyncio.Event()

    async def readiness() -> list[str]:
        await answered.wait()  # the database's ping, unanswered
        return []

    app = FastAPI()
    app.include_router(health.health_router(metrics.registry, readiness, metrics.ready))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:

        async def ready() -> float:
            async with asyncio.timeout(3.0):  # well within a scrape timeout (10 s)
                return parse((await client.get("/metrics")).text).value("canopy_probe_ready")

        assert await ready() == 0  # the check hangs: answered anyway, not ready
        assert await ready() == 0  # still hanging: the same check, not a second one
        answered.set()
        assert await ready() == 1  # the check answered: the scrape waited for it
