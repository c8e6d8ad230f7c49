"""Two participants in Chromium through the whole oTree flow of the example project: oTree's
instructions and quiz, the wait page that creates their Canopy session, the Canopy page
(sent there by oTree, a real stag hunt with one slider moved), Canopy's finished screen and
its redirect back to oTree, and oTree's results page, whose payoffs must be Canopy's session
detail. A real `otree prodserver` (tests/otree/conftest.py) against the session's stack."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, expect

from devstack.stack import StackHandle
from tests.browser.conftest import NewContext
from tests.otree.conftest import OTreeServer

pytestmark = [pytest.mark.otree, pytest.mark.browser]

CONFIG = "canopy_bimatrix_quick"  # two 3-second periods
FLOW_TIMEOUT_MS = 60_000


async def through_otree(context: BrowserContext, server: OTreeServer, code: str) -> Page:
    page = await context.new_page()
    await page.goto(f"{server.url}/InitializeParticipant/{code}")
    await expect(page.get_by_role("heading", name="Instructions")).to_be_visible()
    await page.locator(".otree-btn-next").click()
    await page.locator("input[name=quiz_mix][value='4']").check()
    await page.locator("input[name=quiz_end][value='1']").check()
    await page.locator(".otree-btn-next").click()
    return page


def number(text: str) -> float:
    match = re.search(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    assert match, text
    return float(match.group())


@pytest.mark.timeout(180)
async def test_two_participants_from_otree_to_canopy_and_back(
    stack: StackHandle, otree_server: OTreeServer, new_context: NewContext
) -> None:
    created = otree_server.rest(
        "POST", "/api/sessions", {"session_config_name": CONFIG, "num_participants": 2}
    )
    info = otree_server.rest("POST", f"/api/get_session/{created['code']}", {})
    codes = [p["code"] for p in sorted(info["participants"], key=lambda p: p["id_in_session"])]

    contexts = [await new_context() for _ in codes]
    pages = await asyncio.gather(
        *(through_otree(c, otree_server, code) for c, code in zip(contexts, codes, strict=True))
    )
    # The wait page formed the group, created the Canopy session, and the stage page sent
    # each participant to their own Canopy page.
    gateway = stack.urls.gateway_url
    for page in pages:
        await page.wait_for_url(f"{gateway}/p/*", timeout=FLOW_TIMEOUT_MS)
    # A real move once the period runs: the first participant (the row player) hunts the stag
    # for sure. fill() on the range input fires `input` and `change`, like a drag ending.
    await expect(pages[0].locator("#period")).to_have_attribute(
        "data-state", "running", timeout=FLOW_TIMEOUT_MS
    )
    await pages[0].locator("#slider").fill("1")
    # Canopy's finished screen, then its redirect to oTree's resume link, the stage page
    # submitting itself, and the results.
    for page in pages:
        await page.wait_for_url(re.compile(r"/Results/"), timeout=FLOW_TIMEOUT_MS)
        assert page.url.startswith(otree_server.url)

    session = otree_server.rest(
        "POST", f"/api/get_session/{created['code']}", {"participant_vars": ["canopy_session"]}
    )
    canopy_sessions = {p["canopy_session"] for p in session["participants"]}
    assert len(canopy_sessions) == 1
    (canopy_session,) = canopy_sessions
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{stack.urls.store_url}/api/sessions/{canopy_session}",
            headers={"Authorization": f"Bearer {stack.urls.admin_token}"},
        )
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    seats = {seat["label"]: seat for seat in detail["participants"]}
    assert set(seats) == set(codes)

    for code, page in zip(codes, pages, strict=True):
        seat = seats[code]
        assert seat["outcome"] == "completed"
        assert len(seat["payoffs"]) == 2
        shown_total = number(await page.locator("#total-payoff").inner_text())
        assert shown_total == round(seat["total_payoff"], 2)
        shown = [number(t) for t in await page.locator(".period-payoff").all_inner_texts()]
        assert shown == [round(seat["payoffs"][k], 2) for k in sorted(seat["payoffs"], key=int)]
    # The move counted: stag for sure against a 50 % mix earns the row player 2 per second
    # and the column player 3.5, from the move on (decisions carry over into period 2).
    assert seats[codes[0]]["total_payoff"] < seats[codes[1]]["total_payoff"]
    # oTree's own record, through its REST API: the payoff a lab pays from.
    for p in session["participants"]:
        assert p["payoff_in_real_world_currency"] == pytest.approx(
            round(seats[p["code"]]["total_payoff"], 2) * 0.01, abs=0.006
        )
