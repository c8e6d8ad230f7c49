"""Fixtures of the browser tests: one Debian Chromium per module, fresh contexts per test, and
sessions created through the researchers' API of the session's `stack` (tests/conftest.py).

Every context has the same phone-sized viewport (420×860), so the screenshots the tests save
under docs/screenshots/ show what a participant on a phone sees.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, ViewportSize, async_playwright

from tests.e2e.protocol import remember, session_body

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT: ViewportSize = {"width": 420, "height": 860}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SOON_MS = 5_000  # how long a change may take to show up on another page


def _url(urls: Any, name: str) -> str:
    value = urls[name] if isinstance(urls, dict) else getattr(urls, name)
    return str(value)


class Session:
    """One session created through the researchers' API, and the pages of its participants."""

    def __init__(self, stack: Any, created: dict[str, Any]) -> None:
        self.id: str = created["session"]
        self.store_url = _url(stack.urls, "store_url")
        self.admin_token = _url(stack.urls, "admin_token")
        gateway = _url(stack.urls, "gateway_url").rstrip("/") + "/"
        self.gateway_url = gateway.rstrip("/")
        parts = sorted(created["participants"], key=lambda p: (p["group"], p["id_in_group"]))
        self.codes: list[str] = [p["code"] for p in parts]
        # `url` may be absolute or a path on the gateway: urljoin serves both.
        self.urls: list[str] = [urljoin(gateway, p["url"]) for p in parts]

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def events(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(
                f"{self.store_url}/api/sessions/{self.id}/events",
                params={"format": "jsonl"},
                headers=self._headers(),
            )
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    async def detail(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(
                f"{self.store_url}/api/sessions/{self.id}", headers=self._headers()
            )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def create_session(stack: Any, **config: Any) -> Session:
    body = session_body(label="browser test") | config
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(stack.urls, 'store_url')}/api/sessions",
            headers={"Authorization": f"Bearer {_url(stack.urls, 'admin_token')}"},
            json=body,
        )
    assert response.status_code == 201, response.text
    return Session(stack, remember(response.json()))  # seat keys, for protocol clients


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    started = time.perf_counter()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Shown with a failing test's output: a cold first launch on a fresh machine is slow.
        print(f"chromium {browser.version} launched in {time.perf_counter() - started:.1f} s")
        yield browser
        await browser.close()


NewContext = Callable[[], Awaitable[BrowserContext]]


@pytest.fixture
async def new_context(browser: Browser) -> AsyncIterator[NewContext]:
    """Fresh browser contexts (separate storage, like separate lab machines), closed after the
    test, which fails if any page threw an uncaught exception."""
    contexts: list[BrowserContext] = []
    page_errors: list[str] = []

    async def make() -> BrowserContext:
        context = await browser.new_context(viewport=VIEWPORT)
        context.on("page", lambda page: page.on("pageerror", lambda e: page_errors.append(str(e))))
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        await context.close()
    assert not page_errors, page_errors


async def open_page(context: BrowserContext, url: str) -> Page:
    page = await context.new_page()
    await page.goto(url)
    return page


async def screenshot(page: Page, experiment: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{experiment}.png"), full_page=True)


@pytest.fixture
async def console(browser: Browser) -> AsyncIterator[Page]:
    """A fresh desktop-sized context for the researcher console; fails the test if the page
    threw."""
    context = await browser.new_context(viewport={"width": 1150, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, errors
