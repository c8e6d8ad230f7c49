"""Fixtures of the hostile-input and access-control tests.

Reuses the session's stack (tests/conftest.py) and the e2e clients (tests/e2e/conftest.py:
`api`, `gateway_url`); adds `gateway_process`, a gateway of its own on the same stack for
settings the shared one does not have (a tiny outbox, other allowed origins), and `fuzz`, the
Hypothesis settings every property test here uses (bounded, deterministic, no database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hypothesis import HealthCheck, settings

from tests.e2e.conftest import api, extra_gateway, gateway_url

__all__ = ["api", "fuzz", "gateway_process", "gateway_url"]


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
    async with extra_gateway(stack, env_overrides) as gateway:
        yield gateway.url
