"""The console shows how many dead letters wait (issue 23, "a dead letter shows in the
console"): none, nothing shown; after decisions refused a frame (a newer major version) and the
store kept it, the session list's Refresh shows the count, as `GET /api/dead-letters` says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.async_api import Page, expect

from services.common.bus import BATCH_TYPE, INPUTS, input_key
from services.common.messages import new_id
from tests.browser.conftest import CHROMIUM
from tests.e2e.protocol import create_session
from tests.e2e.test_newer_sender import newer_frame, publish, shards

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
TIMEOUT = 10.0


async def waiting(api: httpx.AsyncClient) -> int:
    response = await api.get("/api/dead-letters", params={"state": "dead", "limit": 1})
    assert response.status_code == 200, response.text
    dead: int = response.json()["dead"]
    return dead


async def test_the_console_shows_the_dead_letters_count(console: Page, stack: Any) -> None:
    urls = stack.urls
    async with httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    ) as api:
        before = await waiting(api)
        await console.goto(f"{urls.store_url}/")
        await console.get_by_label("Admin token").fill(urls.admin_token)
        await console.get_by_role("button", name="Sign in").click()
        await expect(console.locator("#console")).to_be_visible()
        box = console.locator("#dead-letters")
        if before == 0:
            await expect(box).to_be_hidden()
        else:
            await expect(box).to_contain_text(f"{before} dead letter")

        session = await create_session(api, label="console dead letters")
        group = session["groups"][0]
        frame = newer_frame(session, group["participants"][0], 1, 0.5) | {"version": 2}
        key = input_key(group["group"], shards(stack), "batch")
        await publish(stack, INPUTS, key, orjson.dumps([frame]), new_id(), BATCH_TYPE)
        async with asyncio.timeout(TIMEOUT):
            while True:
                if await waiting(api) > before:
                    break
                await asyncio.sleep(0.05)  # decisions refuses it, then the store keeps it

        await console.get_by_role("button", name="Refresh").click()
        await expect(box).to_be_visible()
        await expect(box).to_contain_text(f"{before + 1} dead letter")
        await expect(box).to_contain_text("canopy dead-letters list")
