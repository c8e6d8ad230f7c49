"""Health and metrics routes shared by every service: `/healthz`, `/readyz`, `/metrics`; and
`VitalTasks`, the long-running tasks (consumers, heartbeats) whose end makes a service unready.

A service whose RabbitMQ connection the broker blocks (a memory or disk alarm: see
`services.common.bus.connection`) is not ready, whatever else holds: what it would take in
could not be passed on until the alarm clears."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

log = logging.getLogger(__name__)

READY_MAX_AGE = 5.0  # seconds: how stale `canopy_<service>_ready` may be when scraped
# Seconds a scrape waits for that check: a check that hangs (a database that stopped
# answering) must not fail the scrape, or Prometheus loses every metric of the service, the
# store's lag too, just when they matter (tests/faults/test_db_outage.py).
READY_WAIT = 1.0

ReadinessCheck = Callable[[], Awaitable[list[str]]]


class BlockableBus(Protocol):
    """What readiness reads of the bus (`services.common.bus.Bus`)."""

    @property
    def blocked(self) -> bool: ...

    @property
    def blocked_reason(self) -> str | None: ...


class VitalTasks:
    """Background tasks a service cannot serve without: a consumer loop, a heartbeat.

    Each is meant to run until the service stops, handling a bad message without ending (log,
    count, go on). One that ended anyway (an exception got out, or its loop returned) is a
    readiness problem: before, such a task died silently and /readyz stayed green while the
    service no longer did its work. The end is logged once, at ERROR, with its exception.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def watch(self, name: str, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Watch `task` under `name` (which says what stopped, e.g. "consumer of shard 3")."""
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._ended(name, done))
        return task

    def forget(self, name: str) -> None:
        """Stop watching a task that is being stopped on purpose (a shard handed over)."""
        self._tasks.pop(name, None)

    def problems(self) -> list[str]:
        return [f"{name} stopped" for name, task in self._tasks.items() if task.done()]

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(name) is not task or task.cancelled():
            return  # forgotten, replaced, or cancelled (the service stops)
        error = task.exception()
        log.error("%s stopped%s", name, "" if error else " (its loop ended)", exc_info=error)


def health_router(
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    ready: Gauge | None = None,
    *,
    bus: BlockableBus | None = None,
    blocked: Gauge | None = None,
) -> APIRouter:
    """`readiness` returns the list of unmet conditions; empty means ready. `ready` (the
    service's `canopy_<service>_ready`) keeps the last answer, for Prometheus: `/metrics`
    checks readiness too when the last check is older than READY_MAX_AGE, so the gauge is
    fresh whoever else probes, and frequent scrapes do not repeat the broker and database
    round trips of a check. A scrape waits at most READY_WAIT for it (then the gauge says 0).

    `bus`: while RabbitMQ blocks it, the service is not ready and `readiness` is not asked
    (its broker round trips would wait on the blocked connection until the alarm clears);
    `blocked` (`canopy_<service>_bus_blocked`) says so to Prometheus at every scrape."""
    router = APIRouter()
    checked_at = [float("-inf")]  # monotonic time of the last check
    if bus is not None and blocked is not None:
        blocked.set_function(lambda: float(bus.blocked))

    async def check(request: Request) -> list[str]:
        checked_at[0] = time.monotonic()
        try:
            if bus is not None and bus.blocked:
                problems = [f"RabbitMQ blocks publishers ({bus.blocked_reason})"]
            else:
                problems = await readiness()
        except Exception:
            # Details (host names, exception text) go to the log, not to an unauthenticated body.
            log.exception("readiness check failed")
            problems = ["readiness check failed"]
        if getattr(request.app.state, "draining", False):  # SIGTERM: see services/common/serve
            problems = ["draining: the service is stopping", *problems]
        if ready is not None:
            ready.set(0 if problems else 1)
        return problems

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        problems = await check(request)
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    scraping: list[asyncio.Task[list[str]]] = []  # a scrape's check still under way

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if ready is not None:
            if not scraping and time.monotonic() - checked_at[0] > READY_MAX_AGE:
                task = asyncio.create_task(check(request))
                scraping.append(task)
                task.add_done_callback(scraping.remove)
            if scraping:
                try:
                    await asyncio.wait_for(asyncio.shield(scraping[0]), READY_WAIT)
                except TimeoutError:
                    ready.set(0)  # no answer in time is not ready; the check sets it when done
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
