"""Fixtures of the hostile-input and access-control tests.

Reuses the session's stack (tests/conftest.py) and the e2e clients (tests/e2e/conftest.py:
`api`, `gateway_url`); adds `gateway_process`, a gateway of its own on the same stack for
settings the shared one does not have (a tiny outbox, other allowed origins), and `fuzz`, the
Hypothesis settings every property test here uses (bounded, deterministic, no database).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from hypothesis import HealthCheck, settings

from devstack.infra import free_port, spawn, stop_process
from devstack.stack import PROJECT_ROOT, port_variable
from tests.e2e.conftest import api, gateway_url

__all__ = ["api", "fuzz", "gateway_process", "gateway_url"]

READY_TIMEOUT = 30.0


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings of this folder: at most `max_examples` per test, no deadline (the
    stack shares two cores), the same examples on every run (derandomize), and nothing
    written to .hypothesis/ (database=None)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@asynccontextmanager
async def gateway_process(stack: Any, env_overrides: dict[str, str]) -> AsyncIterator[str]:
    """A gateway of its own on the session's stack (its URL), with some settings changed: the
    shared one keeps the defaults the other tests rely on."""
    port = free_port()
    env = dict(stack.env) | {port_variable("gateway"): str(port)} | env_overrides
    log = stack.logs_dir / f"gateway-hostile-{port}.log"
    process = spawn([sys.executable, "-m", "services.gateway"], env=env, log=log, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                assert process.poll() is None, log.read_text()[-2000:]
                try:
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "extra gateway not ready"
                await asyncio.sleep(0.1)  # a process starting: nothing to wait on but /readyz
        yield url
    finally:
        stop_process(process, grace=5.0)
