"""The researcher console's online-study parts in headless Chromium against the whole stack:
the session form takes external ids, the id parameter, completion and payment; after
creating, the study link and the exact URL to paste into Prolific show with copy buttons;
the live monitor lists each seat's id and status, and a seat the study link gives turns
`playing` there; the payments file downloads as CSV."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import CHROMIUM
from tests.e2e.protocol import Participant, remember

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]


async def test_console_shows_the_study_link_seats_and_payments(console: Page, stack: Any) -> None:
    page, urls = console, stack.urls
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    await page.locator("#experiment").select_option("decisions")
    await page.get_by_label("Participants").fill("2")
    await page.get_by_label("Group size").fill("2")
    await page.get_by_label("Period length (s)").fill("30")
    await page.get_by_label("External ids, one per seat").fill('["P-one", "P-two"]')
    await page.get_by_label("Id parameter of the study link").fill("PROLIFIC_PID")
    await page.get_by_label("Completion").fill(
        '{"completed": {"url": "https://app.prolific.com/submissions/complete?cc=C0DE"}}'
    )
    await page.get_by_label("Payment").fill('{"exchange_rate": 0.5, "currency": "GBP"}')
    await page.get_by_role("button", name="Create session").click()

    join_url = page.locator("#join-url")
    await expect(join_url).to_contain_text("/join/")
    session = str(await page.locator("#created-id").text_content())
    async with httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    ) as api:
        detail = remember((await api.get(f"/api/sessions/{session}")).json())
        assert detail["payment"] == {"exchange_rate": 0.5, "show_up_fee": 0.0, "currency": "GBP"}
        assert detail["label_param"] == "PROLIFIC_PID"
        await expect(join_url).to_have_text(detail["join_url"])
        await expect(page.locator("#prolific-url")).to_have_text(
            f"{detail['join_url']}?PROLIFIC_PID={{{{%PROLIFIC_PID%}}}}"
        )
        await page.get_by_role("button", name="Copy URL").click()
        await expect(page.locator("#join-status")).to_contain_text("URL")

        # The monitor lists each seat's id; the study link's seat turns `playing` live.
        monitor = page.locator("#monitor")
        await expect(page.locator("#monitor-stream")).to_have_attribute("data-status", "open")
        first, second = detail["participants"]
        await expect(monitor.locator(f'[data-participant="{first["code"]}"]')).to_contain_text(
            "P-one"
        )
        row = monitor.locator(f'[data-participant="{second["code"]}"]')
        await expect(row).to_have_attribute("data-seat", "unassigned")
        join_key = detail["join_key"]
        answer = await api.post(f"/internal/join/{join_key}", json={"label": "P-two"})
        assert answer.json()["key"] == second["key"]
        # The monitor reads a seat's label and `taken` when the seat is first seen connected.
        member = await Participant.connect(urls.gateway_url, second["code"])
        await expect(row).to_have_attribute("data-seat", "playing")
        await expect(row.locator(".seat")).to_have_text("playing")
        await member.close()

    async with page.expect_download() as download_info:
        await monitor.get_by_role("button", name="Payments").click()
    download = await download_info.value
    assert download.suggested_filename == f"canopy-{session}-payments.csv"
    text = await asyncio.to_thread(Path(str(await download.path())).read_text)
    lines = text.splitlines()
    assert lines[0] == "label,code,outcome,total_payoff,bonus,show_up_fee,currency"
    assert [line.split(",")[0] for line in lines[1:]] == ["P-one", "P-two"]
