"""docs/online-studies.md, kept true against the whole stack, and its screenshots.

The walk-through's TOML config is read out of the page itself and created with `canopy
create-session`, and its study link is opened the way Prolific opens it (`?PROLIFIC_PID=…`
plus Prolific's other parameters): a config in the docs that stops working fails here. Then a
small study runs from the console in headless Chromium: the form with the study's settings,
the study link and Prolific URL after creating, five people arriving through the study link
(four fill group 1, one waits in group 2), one of group 1 leaving in the last period, and the
monitor showing each seat's Prolific id, status and outcome, then the payments files.

People are played by the bots' WebSocket client (services.bots), which connects with the
seat's key exactly as the page does, except the one whose waiting page is photographed.
Saves docs/screenshots/study-form.png, study-link.png, study-waiting.png (420 px) and
study-monitor.png.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from playwright.async_api import Page, expect

from services.bots.runner import BotFleet, start_bots
from tests.browser.conftest import CHROMIUM, SCREENSHOTS, NewContext, open_page
from tests.e2e.protocol import remember

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "online-studies.md"
# Made-up ids shaped like Prolific's (24 hex digits).
PROLIFIC_IDS = [
    "5f1a2b3c4d5e6f7a8b9c0d1e",
    "60b7c2d9e4f1a3b5c7d9e1f3",
    "61c8d3e0f5a2b4c6d8e0f2a4",
    "62d9e4f1a6b3c5d7e9f1a3b5",
    "63eaf5a2b7c4d6e8f0a2b4c6",
]
# What Prolific appends besides the id ("URL parameters" in its study settings).
PROLIFIC_EXTRA = {"STUDY_ID": "6650f0c1d2e3f4a5b6c7d8e9", "SESSION_ID": "a1b2c3d4e5f6"}
COMPLETED_URL = "https://app.prolific.com/submissions/complete?cc=C1A2B3C4"
PERIOD_SECONDS = 5
END_MS = 30_000  # two 5 s periods and the finished rows, on a loaded 2-core machine


def walkthrough_config() -> str:
    """The first ```toml block of docs/online-studies.md."""
    found = re.search(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert found, f"no ```toml block in {DOC}"
    return found.group(1)


def on_gateway(stack: Any, url: str) -> str:
    """A URL on the deployment's public base, as the same path on this stack's gateway."""
    return urljoin(str(stack.urls.gateway_url).rstrip("/") + "/", urlsplit(url).path)


async def test_the_walkthroughs_config_creates_a_study(stack: Any, tmp_path: Path) -> None:
    config = tmp_path / "study.toml"
    config.write_text(walkthrough_config(), encoding="utf-8")
    urls = stack.urls
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "--api", urls.store_url, "--token",
        urls.admin_token, "create-session", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(command.communicate(), 30)
    assert command.returncode == 0, err.decode()
    printed = out.decode()
    session = printed.split()[1]
    join_url = re.search(r"study link: (\S+)", printed)
    assert join_url, printed

    async with httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    ) as api:
        detail = remember((await api.get(f"/api/sessions/{session}")).json())
        assert detail["join_url"] == join_url.group(1)
        assert detail["label_param"] == "PROLIFIC_PID"
        assert detail["labels"] is None
        assert detail["completion"]["completed"] == {"url": COMPLETED_URL}
        assert set(detail["completion"]["dropout"]) == {"code"}
        assert detail["payment"]["currency"] == "GBP"

        # Prolific opens <join_url>?PROLIFIC_PID=…&STUDY_ID=…&SESSION_ID=…: the first seat.
        link = on_gateway(stack, detail["join_url"])
        query = {"PROLIFIC_PID": PROLIFIC_IDS[0], **PROLIFIC_EXTRA}
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.get(link, params=query)
        assert answer.status_code == 303, answer.text
        first = detail["participants"][0]
        assert answer.headers["location"] == f"/p/{first['key']}"
        seat = (await api.get(f"/api/sessions/{session}")).json()["participants"][0]
        assert (seat["label"], seat["status"], seat["outcome"]) == (
            PROLIFIC_IDS[0],
            "playing",
            None,
        )


async def arrive(link: str, prolific_id: str) -> str:
    """Open the study link as Prolific does; the seat page it sends the person to."""
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(link, params={"PROLIFIC_PID": prolific_id, **PROLIFIC_EXTRA})
    assert answer.status_code == 303, answer.text
    return urljoin(link, answer.headers["location"])


async def test_a_prolific_study_in_the_console(
    console: Page, stack: Any, new_context: NewContext
) -> None:
    page, urls = console, stack.urls
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    await page.locator("#experiment").select_option("public_goods")
    await page.get_by_label("Endowment").fill("20")
    await page.get_by_label("Mpcr").fill("0.5")
    await page.get_by_label("Participants").fill("8")
    await page.get_by_label("Group size").fill("4")
    await page.locator("#f-num_periods").fill("2")
    await page.get_by_label("Period length (s)").fill(str(PERIOD_SECONDS))
    await page.get_by_label("Label", exact=True).fill("Prolific pilot")
    await page.get_by_label("Id parameter of the study link").fill("PROLIFIC_PID")
    await page.get_by_label("Completion").fill(
        f'{{"completed": {{"url": "{COMPLETED_URL}"}},\n "dropout": {{"code": "DROPOUT-7F3K"}}}}'
    )
    await page.get_by_label("Payment").fill(
        '{"exchange_rate": 0.01, "show_up_fee": 1.5, "currency": "GBP"}'
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.locator("#create").screenshot(path=str(SCREENSHOTS / "study-form.png"))
    await page.get_by_role("button", name="Create session").click()

    await expect(page.locator("#join-url")).to_contain_text("/join/")
    await expect(page.locator("#prolific-url")).to_contain_text("?PROLIFIC_PID={{%PROLIFIC_PID%}}")
    await page.locator("#created").screenshot(path=str(SCREENSHOTS / "study-link.png"))
    session = str(await page.locator("#created-id").text_content())
    api = httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    )
    fleets: list[BotFleet] = []
    try:
        detail = (await api.get(f"/api/sessions/{session}")).json()
        link = on_gateway(stack, detail["join_url"])
        group_one, group_two = (g["group"] for g in detail["groups"])
        monitor = page.locator("#monitor")
        await expect(page.locator("#monitor-stream")).to_have_attribute("data-status", "open")

        # Four people fill group 1 (seats go in group order as people arrive): it starts.
        for index, prolific_id in enumerate(PROLIFIC_IDS[:4]):
            seat = await arrive(link, prolific_id)
            fleet = await start_bots(
                [seat], experiment="public_goods", params=detail["params"], num_periods=2,
                seed=index,
            )  # fmt: skip
            fleets.append(fleet)
        for fleet in fleets:
            await fleet.wait_connected()
        first_card = monitor.locator(f'[data-group="{group_one}"]')
        await expect(first_card.locator(".period")).to_have_attribute("data-state", "running")

        # The fifth opens the study link in a phone's browser: group 2, waiting for the rest.
        phone = await open_page(
            await new_context(),
            f"{link}?PROLIFIC_PID={PROLIFIC_IDS[4]}&STUDY_ID={PROLIFIC_EXTRA['STUDY_ID']}",
        )
        await phone.wait_for_url("**/p/*")
        await expect(phone.locator("#waiting")).to_be_visible()
        await expect(phone.locator("#waiting")).to_contain_text(
            "Waiting for everyone in your group to join: 1 of 4 here."
        )
        await phone.screenshot(path=str(SCREENSHOTS / "study-waiting.png"), full_page=True)
        second_card = monitor.locator(f'[data-group="{group_two}"]')
        await expect(second_card.locator(".seat-label")).to_have_text([PROLIFIC_IDS[4]])

        # The third of group 1 leaves in the last period: `dropout` at its end.
        await expect(first_card.locator(".period")).to_contain_text(
            "Period 2/2 running", timeout=END_MS
        )
        await fleets[2].stop()
        await expect(first_card.locator("tr[data-seat=finished]")).to_have_count(4, timeout=END_MS)
        await expect(first_card.locator(".seat")).to_have_text(
            ["finished · completed"] * 2 + ["finished · dropout", "finished · completed"]
        )
        await expect(second_card.locator(".seat")).to_have_text(["playing"] + ["unassigned"] * 3)
        # The bar and the groups (the replay charts below them are console.md's).
        top = await monitor.bounding_box()
        groups = await monitor.locator("#groups").bounding_box()
        assert top and groups
        await page.screenshot(
            path=str(SCREENSHOTS / "study-monitor.png"),
            full_page=True,
            clip={
                "x": top["x"],
                "y": top["y"],
                "width": top["width"],
                "height": groups["y"] + groups["height"] - top["y"] + 12,
            },
        )

        # Paying: the payments file (CSV from the monitor), and Prolific's bulk-bonus text.
        async with page.expect_download() as download_info:
            await monitor.get_by_role("button", name="Payments").click()
        download = await download_info.value
        text = await asyncio.to_thread(Path(str(await download.path())).read_text)
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [(r["label"], r["outcome"]) for r in rows] == [
            (PROLIFIC_IDS[0], "completed"),
            (PROLIFIC_IDS[1], "completed"),
            (PROLIFIC_IDS[2], "dropout"),
            (PROLIFIC_IDS[3], "completed"),
            (PROLIFIC_IDS[4], ""),
        ]
        assert {(r["show_up_fee"], r["currency"]) for r in rows} == {("1.5", "GBP")}
        for row in rows[:4]:
            assert float(row["bonus"]) == round(max(0.0, float(row["total_payoff"])) * 0.01, 2)
        bulk = await api.get(f"/api/sessions/{session}/payments", params={"format": "prolific"})
        # Every labelled seat with a bonus over 0, the dropout too: the researcher decides.
        assert bulk.text == "".join(
            f"{r['label']},{float(r['bonus']):.2f}\n" for r in rows if float(r["bonus"] or 0) > 0
        )
        assert [line.split(",")[0] for line in bulk.text.splitlines()] == PROLIFIC_IDS[:4]
    finally:
        for fleet in fleets:
            await fleet.stop()
        await api.aclose()
