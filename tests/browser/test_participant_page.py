"""The participant page (GET /p/{code}) in headless Chromium against the whole running stack.

Uses the session fixture `stack` (tests/conftest.py): every service up on free ports,
`stack.urls` with `gateway_url`, `store_url` and `admin_token`.

What Chromium does when a context goes offline (checked with Debian's Chromium 156): an
already open WebSocket is not closed, its frames just stop moving until the context is
online again, while new connections fail at once (net::ERR_INTERNET_DISCONNECTED). So the
offline test drops the socket through the client's `dropConnection()` hook, which does what a
real network failure does to it, and the reconnect and resend that follow are the page's own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import (
    CHROMIUM,
    SOON_MS,
    NewContext,
    Session,
    create_session,
    open_page,
    screenshot,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
RECONNECT_MS = 10_000  # backoff is at most 5 s, plus the new connection's hello


@pytest.fixture
async def session(stack: Any) -> Session:
    return await create_session(stack, experiment="decisions", period_length=30)


def row(page: Page, code: str) -> Any:
    return page.locator(f'#members [data-participant="{code}"]')


async def expect_running(page: Page) -> None:
    await expect(page.locator("#status")).to_have_attribute("data-status", "connected")
    await expect(page.locator("#period")).to_have_attribute(
        "data-state", "running", timeout=SOON_MS
    )
    await expect(page.locator("#slider")).to_be_enabled()


async def set_decision(page: Page, value: float) -> None:
    # fill() on a range input sets the value and fires `input` and `change`, like a drag ending.
    await page.locator("#slider").fill(f"{value:.2f}")


async def page_state(page: Page, expression: str) -> Any:
    return await page.evaluate(f"() => window.canopyClient.state.{expression}")


async def test_decision_reaches_the_other_member(session: Session, new_context: NewContext) -> None:
    page_a = await open_page(await new_context(), session.urls[0])
    page_b = await open_page(await new_context(), session.urls[1])
    a, b = session.codes

    for page in (page_a, page_b):
        await expect_running(page)
        await expect(page.locator("#members [data-participant]")).to_have_count(2)
        await expect(row(page, a).locator(".name")).to_contain_text("Player 1")
        await expect(page.locator("#countdown")).to_have_text(re.compile(r"^\d+:\d\d$"))
    await expect(row(page_a, a)).to_have_class(re.compile(r"\byou\b"))
    await expect(row(page_b, b)).to_have_class(re.compile(r"\byou\b"))
    await expect(row(page_b, a)).to_have_attribute("data-presence", "connected")

    await set_decision(page_a, 0.73)

    await expect(row(page_b, a).locator(".decision")).to_have_text("0.73", timeout=SOON_MS)
    await expect(row(page_a, a).locator(".decision")).to_have_text("0.73", timeout=SOON_MS)
    await expect(row(page_b, b).locator(".decision")).to_have_text("–")
    await page_b.wait_for_function("() => window.canopyClient.state.pending.length === 0")
    await page_a.wait_for_function("() => window.canopyClient.state.pending.length === 0")
    await expect(page_a.locator("#errors")).to_be_hidden()

    # The keyboard works too: the slider is labelled, and End / arrow keys move it.
    slider = page_b.get_by_role("slider", name="Your decision, from 0 to 1")
    await slider.focus()
    await page_b.keyboard.press("End")
    await page_b.keyboard.press("ArrowLeft")
    await expect(row(page_a, b).locator(".decision")).to_have_text("0.99", timeout=SOON_MS)

    await expect(page_b.locator("#chart canvas")).to_have_count(1)
    await screenshot(page_b, "decisions")


async def test_offline_changes_arrive_once_after_reconnect(
    stack: Any, new_context: NewContext
) -> None:
    # On the bimatrix page: its slider is the mixed strategy, shown as a percentage.
    session = await create_session(stack, experiment="bimatrix", period_length=30)
    context_a = await new_context()
    page_a = await open_page(context_a, session.urls[0])
    page_b = await open_page(await new_context(), session.urls[1])
    a, b = session.codes
    await expect_running(page_a)
    await expect_running(page_b)

    await set_decision(page_a, 0.25)
    await expect(row(page_b, a).locator(".decision")).to_have_text("25%", timeout=SOON_MS)

    await context_a.set_offline(True)
    if await page_state(page_a, "status") == "connected":
        # Chromium keeps the open socket (see the module docstring): drop it as a network
        # failure would.
        await page_a.evaluate("() => window.canopyClient.dropConnection()")
    await expect(page_a.locator("#status")).to_have_attribute("data-status", "reconnecting")

    # Offline, the slider keeps working: every move waits in the outbox.
    for value in (0.6, 0.7, 0.85):
        await set_decision(page_a, value)
    await expect(page_a.locator("#slider-value")).to_have_text("85%")
    pending = await page_state(page_a, "pending")
    assert [frame["payload"] for frame in pending] == [0.6, 0.7, 0.85]
    await expect(row(page_b, a).locator(".decision")).to_have_text("25%")

    await context_a.set_offline(False)

    await expect(page_a.locator("#status")).to_have_attribute(
        "data-status", "connected", timeout=RECONNECT_MS
    )
    await expect(row(page_b, a).locator(".decision")).to_have_text("85%", timeout=SOON_MS)
    await page_a.wait_for_function(
        "() => window.canopyClient.state.pending.length === 0", timeout=SOON_MS
    )
    assert await page_state(page_a, "connections") >= 2
    # The new connection also receives: B's next change reaches A.
    await set_decision(page_b, 0.4)
    await expect(row(page_a, b).locator(".decision")).to_have_text("40%", timeout=SOON_MS)
    # Both pages are in the same state again: decisions, and the matrix cell they light up.
    for page in (page_a, page_b):
        await page.wait_for_function(
            f"() => window.canopyClient.state.groupDecisions[{json.dumps(b)}] === 0.4"
        )
    states = [await page_state(p, "groupDecisions") for p in (page_a, page_b)]
    assert states[0] == states[1] == {a: 0.85, b: 0.4}
    await expect(page_a.locator("#slider")).to_have_value("0.85")
    await expect(page_a.locator("#matrix td.current")).to_have_attribute("data-cell", "01")
    await expect(page_b.locator("#matrix td.current")).to_have_attribute("data-cell", "10")

    # Every frame A made is in the log exactly once: seqs 1 .. nextSeq - 1, no duplicate.
    sent = list(range(1, await page_state(page_a, "nextSeq")))
    assert len(sent) == 4
    deadline = time.monotonic() + 10  # the store writes in batches: poll until it caught up
    while True:
        rows = [
            event
            for event in await session.events()
            if event["direction"] == "in" and event["participant"] == a
        ]
        logged = Counter(int(event["seq"]) for event in rows)
        if set(logged) >= set(sent) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert sorted(logged) == sent
    assert all(count == 1 for count in logged.values()), logged
    values = [
        json.loads(e["value"]) if isinstance(e["value"], str) else e["value"]
        for e in sorted(rows, key=lambda event: int(event["seq"]))
    ]
    assert values == [0.25, 0.6, 0.7, 0.85]


async def test_second_tab_replaces_the_first(session: Session, new_context: NewContext) -> None:
    context = await new_context()
    first = await open_page(context, session.urls[0])
    await expect(first.locator("#status")).to_have_attribute("data-status", "connected")

    second = await open_page(context, session.urls[0])

    await expect(first.locator("#status")).to_have_attribute(
        "data-status", "replaced", timeout=SOON_MS
    )
    await expect(first.locator("#status")).to_have_text("Opened elsewhere")
    await expect(first.locator("#notice")).to_be_visible()
    await expect(second.locator("#status")).to_have_attribute("data-status", "connected")

    # The first tab stays put (no reconnect fight) until the participant asks for it.
    await first.get_by_role("button", name="Continue in this tab").click()
    await expect(first.locator("#status")).to_have_attribute(
        "data-status", "connected", timeout=SOON_MS
    )
    await expect(second.locator("#status")).to_have_attribute(
        "data-status", "replaced", timeout=SOON_MS
    )
