"""Health and metrics routes shared by every service: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[list[str]]]


def health_router(
    registry: CollectorRegistry, readiness: ReadinessCheck, ready: Gauge | None = None
) -> APIRouter:
    """`readiness` returns the list of unmet conditions; empty means ready. `ready` (the
    service's `canopy_<service>_ready`) keeps the last answer, for Prometheus."""
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        try:
            problems = await readiness()
        except Exception:
            # Details (host names, exception text) go to the log, not to an unauthenticated body.
            log.exception("readiness check failed")
            problems = ["readiness check failed"]
        if getattr(request.app.state, "draining", False):  # SIGTERM: see services/common/serve
            problems = ["draining: the service is stopping", *problems]
        if ready is not None:
            ready.set(0 if problems else 1)
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
