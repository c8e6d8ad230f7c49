"""The researcher console (GET / on the store) in headless Chromium against the whole stack.

The console signs in, creates a session from the form built from the experiments' schemas,
and its live monitor (SSE) shows real WebSocket participants connecting within a second, their
decisions, the period's end and the replay chart. The monitor's screenshot goes to
docs/screenshots/monitor.png (shown in the README).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import CHROMIUM
from tests.e2e.protocol import KEYS, Participant

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "monitor.png"
PERIOD_SECONDS = 6
SECOND_MS = 1_000


async def test_console_creates_a_session_and_monitors_it_live(console: Page, stack: Any) -> None:
    page, urls = console, stack.urls
    gateway_url = urls.gateway_url
    # make run's link carries the token once; the console moves it out of the address bar.
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    assert urls.admin_token not in page.url
    stored = await page.evaluate("() => sessionStorage.getItem('canopy.adminToken')")
    assert stored == urls.admin_token
    assert await page.evaluate("() => localStorage.length") == 0

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#sign-in")).to_be_visible()
    await page.get_by_label("Admin token").fill("not the token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#sign-in-error")).to_contain_text("refused")
    await page.get_by_label("Admin token").fill(urls.admin_token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#console")).to_be_visible()

    # The form knows each experiment's params from its schema.
    await page.locator("#experiment").select_option("bimatrix")
    game = page.locator('[name="params.game"]')
    await expect(game.locator("option")).to_have_count(5)  # the default, then the four games
    await expect(page.locator('[name="params.payoff_matrix"]')).to_have_attribute(
        "data-kind", "json"
    )
    # A refusal names the field, and the form marks it.
    await page.locator('[name="params.payoff_matrix"]').fill("[[1, 2]]")
    await page.get_by_role("button", name="Create session").click()
    await expect(page.locator("#create-error")).to_contain_text("params.payoff_matrix")
    await expect(page.locator('[name="params.payoff_matrix"]')).to_have_attribute(
        "aria-invalid", "true"
    )
    await page.locator('[name="params.payoff_matrix"]').fill("")
    await game.select_option(label="stag_hunt")
    await page.get_by_label("Participants").fill("4")
    await page.get_by_label("Group size").fill("2")
    await page.get_by_label("Period length (s)").fill(str(PERIOD_SECONDS))
    await page.get_by_label("Label").fill("console test")
    await page.get_by_role("button", name="Create session").click()

    links = page.locator("#created-links a")
    await expect(links).to_have_count(4)
    # The links are listed by group, then player: the first two are the first group.
    hrefs = [str(await link.get_attribute("href")) for link in await links.all()]
    # Each link holds its seat's key; the list names the participant's public code beside it.
    items = page.locator("#created-links li")
    codes = [str(await item.get_attribute("data-code")) for item in (await items.all())[:2]]
    for href, code in zip(hrefs[:2], codes, strict=True):
        KEYS[code] = href.rsplit("/", 1)[-1]
        assert code not in href
    await expect(page.locator("#monitor-stream")).to_have_attribute("data-status", "open")
    monitor = page.locator("#monitor")
    first_group = monitor.locator(".group").filter(
        has=page.locator(f'[data-participant="{codes[0]}"]')
    )
    period = first_group.locator(".period")
    await expect(period).to_have_attribute("data-state", "waiting")
    await expect(period).to_contain_text("waiting")

    # Participants connecting show within a second.
    members = []
    timings = []
    for code in codes:
        started = time.perf_counter()
        members.append(await Participant.connect(gateway_url, code))
        row = monitor.locator(f'[data-participant="{code}"]')
        await expect(row).to_have_attribute("data-connected", "true", timeout=SECOND_MS)
        timings.append(time.perf_counter() - started)
    await expect(period).to_have_attribute("data-state", "running")
    await expect(period).to_contain_text(re.compile(r"running · 0:0\d left"))

    for member in members:
        await member.expect("period_start")
    for value, member in zip((0.8, 0.3), members, strict=True):
        await member.ack(await member.send(value))
    for shown, code in zip(("0.80", "0.30"), codes, strict=True):
        decision = monitor.locator(f'[data-participant="{code}"] .decision')
        await expect(decision).to_have_text(shown, timeout=SECOND_MS)
    # The other group's slots, filled with bots from the console.
    await monitor.get_by_role("button", name="Fill empty slots with bots").click()
    await expect(monitor.locator("#bots-status")).to_contain_text("2 bot(s) playing")
    await expect(monitor.locator('[data-connected="true"]')).to_have_count(4, timeout=5_000)
    await expect(monitor.locator('.period[data-state="running"]')).to_have_count(2)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)

    # The end of the period, then each group's replay chart (uPlot draws on a canvas).
    await expect(monitor.locator('.period[data-state="ended"]')).to_have_count(
        2, timeout=(PERIOD_SECONDS + 5) * SECOND_MS
    )
    await expect(page.locator("#replay canvas")).to_have_count(2)
    await expect(page.locator("#replay .payoffs tbody tr")).to_have_count(2)
    await expect(page.locator("#replay .u-legend").first).to_contain_text("Player 2")

    async with page.expect_download() as download_info:
        await monitor.get_by_role("button", name="CSV").click()
    download = await download_info.value
    path = await download.path()
    header = (await asyncio.to_thread(Path(path).read_text)).splitlines()[0]
    assert header == "ts,session,group,participant,direction,channel,seq,value"

    for member in members:
        await member.close()
    for code in codes:
        row = monitor.locator(f'[data-participant="{code}"]')
        await expect(row).to_have_attribute("data-connected", "false", timeout=SECOND_MS)
    print(f"console: connects shown after {[round(t * 1000) for t in timings]} ms")
