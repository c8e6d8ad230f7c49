"""Online studies in headless Chromium against the whole stack (PROTOCOL v2 "Online studies"):
the study link `/join/{join_key}` hands out seats (the same label the same seat from any
browser, a label-less browser its own seat again by its cookie, and "this study is full" with
the `full` outcome's code once the seats run out), and the page's finished screen at the end
(the completion code that copies, the countdown to a redirect, "already taken part" for a
seat that opens its link again). Saves docs/screenshots/finished.png and full.png (420 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.browser.conftest import (
    CHROMIUM,
    SOON_MS,
    NewContext,
    Session,
    _url,
    open_page,
    screenshot,
)
from tests.e2e.protocol import Participant, remember, session_body

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
END_MS = 15_000  # a 2 s period and the finished message, even on a loaded machine


async def create_study(stack: Any, **config: Any) -> tuple[Session, str]:
    """A session through the researchers' API, and its study link on the test's gateway."""
    body = session_body(label="browser test: online study") | config
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(stack.urls, 'store_url')}/api/sessions",
            headers={"Authorization": f"Bearer {_url(stack.urls, 'admin_token')}"},
            json=body,
        )
    assert response.status_code == 201, response.text
    created = remember(response.json())
    session = Session(stack, created)
    # join_url is on the deployment's public base: the same path on this stack's gateway.
    link = urljoin(session.gateway_url + "/", urlsplit(created["join_url"]).path)
    return session, link


async def arrive(context: BrowserContext, url: str) -> tuple[Page, str]:
    """Open a study link; the seat key of the page it lands on."""
    page = await open_page(context, url)
    await page.wait_for_url("**/p/*", timeout=SOON_MS)
    return page, urlsplit(page.url).path.removeprefix("/p/")


async def test_the_study_link_gives_seats_by_label_and_by_cookie_until_full(
    stack: Any, new_context: NewContext
) -> None:
    session, link = await create_study(
        stack,
        num_participants=4,
        group_size=2,
        completion={"full": {"code": "FULL-42"}},
    )
    keys = {urlsplit(url).path.removeprefix("/p/") for url in session.urls}

    # A label: a seat; the same label from another browser (another machine): the same seat.
    _, first = await arrive(await new_context(), f"{link}?label=P1")
    _, again = await arrive(await new_context(), f"{link}?label=P1")
    assert first in keys
    assert again == first

    # No label: a seat of its own, and the same one again in the same browser (its cookie)...
    browser = await new_context()
    _, mine = await arrive(browser, link)
    _, mine_again = await arrive(browser, link)
    assert mine in keys - {first}
    assert mine_again == mine
    cookies = await browser.cookies()
    assert [(c["name"], c["path"], c["httpOnly"]) for c in cookies] == [
        ("canopy_seat", urlsplit(link).path, True)
    ]
    # ...but not in another browser.
    _, other = await arrive(await new_context(), link)
    assert other in keys - {first, mine}

    # The fourth and last seat, then no seat left.
    _, last = await arrive(await new_context(), f"{link}?label=P4")
    assert last in keys - {first, mine, other}
    full = await open_page(await new_context(), f"{link}?label=P5")
    assert urlsplit(full.url).path == urlsplit(link).path  # no redirect to a seat
    await expect(full.locator("h2")).to_have_text("This study is full")
    await expect(full.locator("#completion-code")).to_have_text("FULL-42")
    await screenshot(full, "full")
    # Those already seated keep their seats.
    _, back = await arrive(await new_context(), f"{link}?label=P1")
    assert back == first

    # A made-up join key: not valid, and nothing about the session.
    forged = link[:-1] + ("A" if link[-1] != "A" else "B")
    page = await open_page(await new_context(), forged)
    await expect(page.locator("h2")).to_have_text("This study link is not valid")


async def test_the_finished_screen_shows_the_code_that_copies(
    stack: Any, new_context: NewContext
) -> None:
    session, _ = await create_study(
        stack, period_length=2, completion={"completed": {"code": "C-123"}}
    )
    context = await new_context()
    await context.grant_permissions(
        ["clipboard-read", "clipboard-write"], origin=session.gateway_url
    )
    page = await open_page(context, session.urls[0])
    member = await Participant.connect(session.gateway_url, session.codes[1])
    try:
        await expect(page.locator("#period")).to_have_attribute(
            "data-state", "running", timeout=SOON_MS
        )
        finished = await member.expect("finished", timeout=END_MS / 1000)
        assert finished["outcome"] == "completed"
        assert finished["code"] == "C-123"

        await expect(page.locator("#finished")).to_be_visible(timeout=END_MS)
        await expect(page.locator("#finished-heading")).to_have_text("You have finished")
        await expect(page.locator("#finished-heading")).to_be_focused()
        await expect(page.locator("#completion-code")).to_have_text("C-123")
        await expect(page.locator("#finished-total")).to_have_text(
            "Your total payoff: 0.00."  # `decisions` pays nothing
        )
        await expect(page.locator("#experiment")).to_be_hidden()
        await page.locator("#copy-code").click()
        await expect(page.locator("#copy-note")).to_have_text("Copied.")
        assert await page.evaluate("() => navigator.clipboard.readText()") == "C-123"
        await screenshot(page, "finished")

        # The same seat's link opened again (another browser): hello, then finished again.
        again = await open_page(await new_context(), session.urls[0])
        await expect(again.locator("#finished-heading")).to_have_text(
            "You have already taken part", timeout=SOON_MS
        )
        await expect(again.locator("#completion-code")).to_have_text("C-123")
    finally:
        await member.close()


async def test_the_finished_screen_counts_down_to_the_redirect_and_goes(
    stack: Any, new_context: NewContext
) -> None:
    gateway = _url(stack.urls, "gateway_url").rstrip("/")
    # Somewhere on the gateway itself that the test can see the page arrive at.
    target = gateway + "/static/participant.css?done={code}"
    session, _ = await create_study(
        stack, period_length=2, completion={"completed": {"url": target}}
    )
    page = await open_page(await new_context(), session.urls[0])
    member = await Participant.connect(session.gateway_url, session.codes[1])
    try:
        await expect(page.locator("#leaving")).to_be_visible(timeout=END_MS)
        destination = target.replace("{code}", session.codes[0])
        await expect(page.locator("#leave-now")).to_have_attribute("href", destination)
        seconds = int(await page.locator("#leaving-seconds").inner_text())
        assert 1 <= seconds <= 5
        assert urlsplit(page.url).path.startswith("/p/")  # not yet gone
        await page.wait_for_url(destination, timeout=10_000)
    finally:
        await member.close()


async def test_the_full_page_counts_down_to_the_full_outcomes_redirect(
    stack: Any, new_context: NewContext
) -> None:
    gateway = _url(stack.urls, "gateway_url").rstrip("/")
    target = gateway + "/static/participant.css?full={label}"
    _, link = await create_study(stack, completion={"full": {"url": target}})
    for label in ("A", "B"):
        await arrive(await new_context(), f"{link}?label={label}")
    page = await open_page(await new_context(), f"{link}?label=C%20D")
    await expect(page.locator("h2")).to_have_text("This study is full")
    destination = target.replace("{label}", "C%20D")
    await expect(page.locator("#leave-now")).to_have_attribute("href", destination)
    await expect(page.locator("#leaving")).to_contain_text("You will be taken back in")
    await page.wait_for_url(destination, timeout=10_000)


async def test_a_session_label_param_names_the_label_in_the_link(
    stack: Any, new_context: NewContext
) -> None:
    # Prolific's link: the label is PROLIFIC_PID, among parameters the study does not use.
    _, link = await create_study(stack, label_param="PROLIFIC_PID")
    query = "?PROLIFIC_PID=5f0c&STUDY_ID=st1&SESSION_ID=se1"
    one = await new_context()
    _, seat = await arrive(one, link + query)
    _, again = await arrive(await new_context(), link + query.replace("se1", "se2"))
    assert again == seat
    assert await one.cookies() == []  # a labelled arrival needs no cookie
    # `label` means nothing in this session: a label-less arrival, the other seat.
    _, other = await arrive(await new_context(), f"{link}?label=5f0c")
    assert other != seat
