"""Fixtures for end-to-end tests: the researchers' API client of the running stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest


@pytest.fixture
async def api(stack: Any) -> AsyncIterator[httpx.AsyncClient]:
    urls = stack.urls
    async with httpx.AsyncClient(
        base_url=urls.store_url,
        headers={"Authorization": f"Bearer {urls.admin_token}"},
        timeout=10.0,
    ) as client:
        yield client


@pytest.fixture
def gateway_url(stack: Any) -> str:
    url: str = stack.urls.gateway_url
    return url
