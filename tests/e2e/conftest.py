"""Fixtures for end-to-end tests: the researchers' API client of the running stack, and
`extra_gateway` / `extra_service`, another gateway (or other service) process on it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from devstack.infra import Popen, free_port, spawn, stop_process
from devstack.stack import PROJECT_ROOT, port_variable
from tests.e2e.protocol import RESEARCHER_HOOKS

READY_TIMEOUT = 30.0


@dataclass
class ServiceProcess:
    url: str
    process: Popen


Gateway = ServiceProcess


@asynccontextmanager
async def extra_gateway(
    stack: Any, env_overrides: dict[str, str] | None = None
) -> AsyncIterator[Gateway]:
    """A gateway process of its own on the session's stack, ready (a test may kill it, or give
    it settings the shared one does not have); stopped on exit."""
    async with extra_service(stack, "gateway", env_overrides) as gateway:
        yield gateway


@asynccontextmanager
async def extra_service(
    stack: Any, service: str, env_overrides: dict[str, str] | None = None
) -> AsyncIterator[ServiceProcess]:
    """Another process of `service` on a running stack, on a port of its own, ready."""
    port = free_port()
    env = dict(stack.env) | {port_variable(service): str(port)}
    env["CANOPY_AMQP_URL"] = stack.infra.service_amqp_url(service)  # its own broker user
    env |= env_overrides or {}
    log = stack.logs_dir / f"{service}-{port}.log"
    process = spawn(
        [sys.executable, "-m", f"services.{service}"], env=env, log=log, cwd=PROJECT_ROOT
    )
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
                assert time.monotonic() < deadline, f"extra {service} not ready"
                await asyncio.sleep(0.1)  # a process starting: nothing to wait on but /readyz
        yield ServiceProcess(url, process)
    finally:
        stop_process(process, grace=5.0)


@pytest.fixture
async def api(stack: Any) -> AsyncIterator[httpx.AsyncClient]:
    urls = stack.urls
    async with httpx.AsyncClient(
        base_url=urls.store_url,
        headers={"Authorization": f"Bearer {urls.admin_token}"},
        timeout=10.0,
        event_hooks=RESEARCHER_HOOKS,  # notes seat keys (tests.e2e.protocol)
    ) as client:
        yield client


@pytest.fixture
def gateway_url(stack: Any) -> str:
    url: str = stack.urls.gateway_url
    return url
